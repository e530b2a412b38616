"""Read the data formats users bring into one internal form.

Accepted, per record (JSONL line, JSON list item, or text file):

- ``{"text": ...}`` and ``.txt`` files: raw text for continued pre-training (PT);
- ``{"messages": [{"role", "content"}, ...]}``: chat (OpenAI / mlx-lm style);
- ShareGPT ``{"conversations": [{"from", "value"}, ...], "system"?}``;
- Alpaca ``{"instruction", "input"?, "output", "system"?, "history"?}`` (LLaMA-Factory's form);
- ``{"prompt", "completion" | "response" | "output" | "label"}``.

A path may be a file (``.jsonl``, ``.json``, ``.txt``), a glob (``data/pt_*.jsonl``), a directory of
such files, or a local
Hugging Face dataset directory (``datasets.save_to_disk``; streamed, never loaded whole).

Bad records raise ``DataError`` naming file, line and field; with ``skip_bad`` they are counted and
reported instead. No tokenizers or models here: tokenizing is ``mlx_med.data.packing`` and ``.sft``'s job.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlx_med.errors import DataError, UserError

Kind = Literal["text", "chat", "any"]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
COMPLETION_KEYS = ("completion", "response", "output", "label")
DATA_SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Example:
    """One record. Exactly one of ``text`` / ``messages`` is set.

    ``meta`` keeps the record's other fields (ids, labels such as PubMedQA's ``final_decision``).
    ``source`` is ``file:line`` for error messages further down the line.
    """

    source: str
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class SkipReport:
    """What ``skip_bad`` dropped: a count and the first few reasons."""

    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.skipped += 1
        if len(self.reasons) < 5:
            self.reasons.append(str(err))

    def summary(self) -> str:
        if not self.skipped:
            return "no bad records"
        more = "" if self.skipped <= len(self.reasons) else f" (first {len(self.reasons)} shown)"
        return f"skipped {self.skipped} bad record(s){more}:\n  " + "\n  ".join(self.reasons)


def iter_examples(
    path: str | Path, kind: Kind = "any", skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Stream records under ``path``, normalised to ``Example``.

    Args:
        path: file, directory of data files, or a local HF dataset directory.
        kind: ``"text"`` accepts only PT text, ``"chat"`` only conversations, ``"any"`` both.
        skip_bad: count and skip bad records instead of raising.
        report: where skipped records are counted (created if None).

    Raises:
        DataError: on the first bad record, unless ``skip_bad``.
        UserError: when ``path`` does not exist or holds no data files.
    """
    report = report if report is not None else SkipReport()
    for file in _data_files(Path(path)):
        for source, line, parsed in _raw_records(file):
            try:
                if isinstance(parsed, DataError):
                    raise parsed
                yield _normalise(parsed, file, line, source, kind)
            except DataError as err:
                if not skip_bad:
                    raise
                report.add(err)


def _data_files(path: Path) -> list[Path]:
    if not path.exists() and glob.has_magic(str(path)):
        matches = sorted(Path(m) for m in glob.glob(str(path)))
        if not matches:
            raise UserError(f"no data files match {path}")
        return [f for m in matches for f in _data_files(m)]
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if path.is_file():
        return [path]
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this directory")
    return files


def _raw_records(file: Path) -> Iterator[tuple[str, int | None, Any]]:
    """Yield (source, line, record-or-DataError) for one file."""
    if file.is_dir():
        yield from _hf_dataset_records(file)
    elif file.suffix == ".txt":
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            line = file.read_bytes()[: err.start].count(b"\n") + 1
            yield str(file), line, DataError(file, line, None, f"not valid UTF-8 (byte 0x{file.read_bytes()[err.start]:02x})")
            return
        yield str(file), None, {"text": text}
    elif file.suffix == ".json":
        yield from _json_records(file)
    else:
        yield from _jsonl_records(file)


def _jsonl_records(file: Path) -> Iterator[tuple[str, int, Any]]:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield source, number, DataError(
                    file, number, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                )
                continue
            if not line.strip():
                continue
            try:
                yield source, number, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield source, number, DataError(file, number, None, f"invalid JSON ({err.msg} at column {err.colno})")
            except RecursionError:  # e.g. 100 000 nested "[": hostile, not a record
                yield source, number, DataError(file, number, None, "invalid JSON (nested too deeply)")


def _json_records(file: Path) -> Iterator[tuple[str, int | None, Any]]:
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        yield str(file), None, DataError(file, None, None, f"not valid UTF-8 (byte offset {err.start})")
        return
    except json.JSONDecodeError as err:
        yield str(file), err.lineno, DataError(file, err.lineno, None, f"invalid JSON ({err.msg} at column {err.colno})")
        return
    except RecursionError:
        yield str(file), None, DataError(file, None, None, "invalid JSON (nested too deeply)")
        return
    if not isinstance(data, list):
        yield str(file), None, DataError(file, None, None, "a .json data file must hold a list of records")
        return
    for index, item in enumerate(data):
        yield f"{file}[{index}]", None, item if isinstance(item, dict) else DataError(
            file, None, f"[{index}]", f"expected an object, got {type(item).__name__}"
        )


def _hf_dataset_records(folder: Path) -> Iterator[tuple[str, int | None, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # datasets raises many types for a bad folder
        raise UserError(f"{folder}: not a readable Hugging Face dataset directory ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for index, row in enumerate(ds):
        yield f"{folder}[{index}]", index + 1, row


def _normalise(record: Any, file: Path, line: int | None, source: str, kind: Kind) -> Example:
    def fail(fld: str | None, problem: str) -> DataError:
        return DataError(file, line, fld, problem)

    if not isinstance(record, dict):
        raise fail(None, f"expected a JSON object, got {type(record).__name__}")

    if "text" in record and not any(k in record for k in ("messages", "conversations", "instruction", "prompt")):
        text = _string(record, "text", fail)
        if kind == "chat":
            raise fail("text", "this is a raw-text (PT) record; SFT/eval data needs conversations "
                       "(messages, conversations, instruction/output or prompt/completion)")
        meta = {k: v for k, v in record.items() if k != "text"}
        return Example(source=source, text=text, meta=meta)

    if "messages" in record:
        messages = _messages(record["messages"], "messages", "role", "content", ROLES, fail)
        rest = ("messages",)
    elif "conversations" in record:
        messages = _messages(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES, fail)
        if record.get("system"):
            messages = [{"role": "system", "content": _string(record, "system", fail)}, *messages]
        rest = ("conversations", "system")
    elif "instruction" in record:
        messages = _alpaca(record, fail)
        rest = ("instruction", "input", "output", "system", "history")
    elif "prompt" in record:
        prompt = _string(record, "prompt", fail)
        answer_key = next((k for k in COMPLETION_KEYS if k in record), None)
        if answer_key is None:
            raise fail("completion", "missing (a prompt record needs one of: " + ", ".join(COMPLETION_KEYS) + ")")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _string(record, answer_key, fail)}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _string(record, "system", fail)})
        rest = ("prompt", answer_key, "system")
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise fail(None, "unrecognised record: expected 'text', 'messages', 'conversations', "
                   f"'instruction' or 'prompt' (found keys: {keys})")

    if kind == "text":
        raise fail(None, "this is a chat record; PT data needs raw text ({\"text\": ...} lines or .txt files)")
    if not any(m["role"] == "assistant" for m in messages):
        raise fail("messages", "no assistant turn (nothing to learn or to compare against)")
    meta = {k: v for k, v in record.items() if k not in rest}
    return Example(source=source, messages=tuple(messages), meta=meta)


def _string(record: dict, key: str, fail) -> str:
    if key not in record or record[key] is None:
        raise fail(key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise fail(key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise fail(key, "empty")
    return value


def _messages(turns: Any, name: str, role_key: str, content_key: str, roles, fail) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise fail(name, f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise fail(name, "empty")
    out = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise fail(where, f"expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role is None:
            raise fail(f"{where}.{role_key}", "missing")
        if not isinstance(role, str) or role not in roles:
            allowed = ", ".join(sorted(set(roles) if isinstance(roles, tuple) else roles))
            raise fail(f"{where}.{role_key}", f"unknown role {role!r} (allowed: {allowed})")
        content = turn.get(content_key)
        if content is None:
            raise fail(f"{where}.{content_key}", "missing")
        if not isinstance(content, str):
            raise fail(f"{where}.{content_key}", f"expected a string, got {type(content).__name__}")
        mapped = roles[role] if isinstance(roles, dict) else role
        if not content.strip() and mapped != "system":
            raise fail(f"{where}.{content_key}", "empty")
        out.append({"role": mapped, "content": content})
    return out


def _alpaca(record: dict, fail) -> list[dict[str, str]]:
    instruction = _string(record, "instruction", fail)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise fail("input", f"expected a string, got {type(extra).__name__}")
    messages: list[dict[str, str]] = []
    if record.get("system"):
        messages.append({"role": "system", "content": _string(record, "system", fail)})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise fail("history", f"expected a list of [question, answer] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise fail(f"history[{i}]", "expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": _string(record, "output", fail)}]
    return messages
