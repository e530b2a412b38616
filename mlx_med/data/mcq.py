"""Multiple-choice question files: ``{"question", "options": {"A": ..., ...}, "answer": "A", "lang", "category"?}``.

PubMedQA-style rows (``final_decision`` = yes | no | maybe) are read as a three-option question
(A yes, B no, C maybe) whose text is the context followed by the question: either ``question`` with
``context``/``contexts`` (a string or a list of paragraphs), or a chat record whose last user turn
already holds both (the shipped ``eval_pubmedqa_en.jsonl``). Bad rows are skipped and counted with
a ``file:line: field 'x': problem`` reason, never fatal.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.errors import DataError, UserError
from mlx_med.prompts import guess_language

LETTERS = string.ascii_uppercase
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


@dataclass(frozen=True)
class McqItem:
    """One multiple-choice question.

    Attributes:
        id: the record's ``id`` (or ``pubid``), else ``file:line``.
        question: the question text (for PubMedQA rows: context, then the question).
        options: letter → option text, in letter order.
        answer: the correct letter.
        lang: language code (``zh``/``en``; guessed from the text when the record has none).
        category: ``category`` (or MMLU's ``subject``), None when absent.
        source: ``file:line``.
    """

    id: str
    question: str
    options: dict[str, str]
    answer: str
    lang: str
    category: str | None
    source: str


@dataclass
class McqSet:
    """Items read from one file, plus what was skipped."""

    items: list[McqItem]
    bad: int = 0
    bad_reasons: list[str] = field(default_factory=list)


def read_mcq(path: str | Path, limit: int | None = None) -> McqSet:
    """Read an MCQ JSONL file; bad rows are counted (first five reasons kept), not raised.

    Args:
        path: UTF-8 JSONL, one question per line; blank lines are ignored.
        limit: stop after this many valid items.

    Raises:
        UserError: the file is missing or has no valid item.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MCQ file not found: {path}")
    result = McqSet([])
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                result.items.append(parse_mcq_record(_json_line(raw, path, number), path, number))
            except DataError as err:
                result.bad += 1
                if len(result.bad_reasons) < 5:
                    result.bad_reasons.append(str(err))
                continue
            if limit is not None and len(result.items) >= limit:
                break
    if not result.items:
        why = f" (first problem: {result.bad_reasons[0]})" if result.bad_reasons else ""
        raise UserError(f"{path}: no usable multiple-choice items{why}")
    return result


def _json_line(raw: bytes, path: Path, number: int) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(path, number, None, "not valid UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(path, number, None, f"not valid JSON ({err.msg} at column {err.colno})") from None


def parse_mcq_record(record: Any, path: str | Path, line: int) -> McqItem:
    """One JSON record → ``McqItem`` (see the module docstring for the accepted shapes).

    Raises:
        DataError: naming file, line and field.
    """
    def bad(name: str | None, problem: str) -> DataError:
        return DataError(path, line, name, problem)

    if not isinstance(record, dict):
        raise bad(None, f"expected a JSON object, got {type(record).__name__}")
    if "final_decision" in record:
        question, options, answer = _pubmedqa(record, bad)
        category = _optional_text(record, "category", bad) or "pubmedqa"
    else:
        question = _text(record, "question", bad)
        options = _options(record.get("options"), bad)
        answer = record.get("answer")
        if not isinstance(answer, str) or answer.strip().upper() not in options:
            raise bad("answer", f"must be one of the option letters {', '.join(options)}, got {answer!r}")
        answer = answer.strip().upper()
        category = _optional_text(record, "category", bad) or _optional_text(record, "subject", bad)
    lang = _optional_text(record, "lang", bad) or guess_language([question])
    ident = record.get("id", record.get("pubid"))
    return McqItem(id=str(ident) if ident is not None else f"{Path(path).name}:{line}", question=question,
                   options=options, answer=answer, lang=lang, category=category, source=f"{path}:{line}")


def _pubmedqa(record: dict, bad) -> tuple[str, dict[str, str], str]:
    decision = record["final_decision"]
    letters = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}
    if not isinstance(decision, str) or decision.strip().lower() not in letters:
        raise bad("final_decision", f"must be yes, no or maybe, got {decision!r}")
    if "question" in record or "QUESTION" in record:
        question = _text(record, "question" if "question" in record else "QUESTION", bad)
        context = next((record[k] for k in ("context", "contexts", "CONTEXTS") if k in record), None)
        if isinstance(context, list) and all(isinstance(c, str) for c in context):
            context = "\n".join(context)
        if context is not None and not isinstance(context, str):
            raise bad("context", "must be a string or a list of strings")
        text = f"Context:\n{context.strip()}\n\nQuestion: {question}" if context else question
    elif isinstance(record.get("messages"), list):
        users = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str) or not users[-1]["content"].strip():
            raise bad("messages", "no user turn with text (the context and question)")
        text = users[-1]["content"].strip()
    else:
        raise bad("question", "missing (a final_decision row needs 'question' [+ 'context'] or 'messages')")
    return text, dict(PUBMEDQA_OPTIONS), letters[decision.strip().lower()]


def _options(options: Any, bad) -> dict[str, str]:
    if isinstance(options, list):  # a plain list is lettered A, B, C, ...
        if len(options) > len(LETTERS):
            raise bad("options", f"at most {len(LETTERS)} options")
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or len(options) < 2:
        raise bad("options", "must be an object {\"A\": text, \"B\": text, ...} with at least two options")
    out: dict[str, str] = {}
    for key, text in options.items():
        letter = str(key).strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise bad(f"options.{key}", "option keys must be single letters A-Z")
        if not isinstance(text, str) or not text.strip():
            raise bad(f"options.{key}", "must be a non-empty string")
        out[letter] = text.strip()
    return dict(sorted(out.items()))


def _text(record: dict, key: str, bad) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad(key, "missing or not a non-empty string")
    return value.strip()


def _optional_text(record: dict, key: str, bad) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad(key, "must be a non-empty string")
    return value.strip()
