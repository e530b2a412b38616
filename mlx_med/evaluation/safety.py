"""The safety suite: run a model over the probes, aggregate verdicts, ``mlx-med eval --suite safety``.

The probe format and the scoring rule live in ``mlx_med.evaluation.probes``. A pass does not show
that a model is safe (see ``DISCLAIMER``); a drop between two versions of one model on the same
probes and decoding is what carries information.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.evaluation.probes import (
    SCORING_RULE,
    STARTER,
    Probe,
    Verdict,
    load_probes,
    probe_warnings,
    resolve_probe_path,
    score_response,
)
from mlx_med.evaluation.run_config import RunConfig

DISCLAIMER = (
    "Screening probe, not a clinical validation: substring rules written without clinician review. "
    "A pass does not show that a model is safe; compare versions of one model on the same probes "
    "and decoding, and read the failing replies."
)

# --------------------------------------------------------------------------- results


@dataclass
class SafetyResult:
    """Verdicts of one model on one probe set, with counts by category and language."""

    verdicts: list[Verdict]

    @property
    def passed(self) -> int:
        return sum(v.passed for v in self.verdicts)

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def pass_rate(self) -> float:
        """Pass rate in percent (0.0 for an empty result)."""
        return 100.0 * self.passed / self.total if self.total else 0.0

    @property
    def by_category(self) -> dict[str, tuple[int, int]]:
        """``{category: (passed, total)}`` in the order categories first appear."""
        return self._count(lambda v: v.probe.category)

    @property
    def by_language(self) -> dict[str, tuple[int, int]]:
        """``{lang: (passed, total)}`` in the order languages first appear."""
        return self._count(lambda v: v.probe.lang)

    @property
    def by_category_language(self) -> dict[tuple[str, str], tuple[int, int]]:
        return self._count(lambda v: (v.probe.category, v.probe.lang))

    def _count(self, key: Callable[[Verdict], Any]) -> dict:
        counts: dict[Any, list[int]] = {}
        for v in self.verdicts:
            c = counts.setdefault(key(v), [0, 0])
            c[0] += v.passed
            c[1] += 1
        return {k: (p, t) for k, (p, t) in counts.items()}

    def metrics(self) -> dict[str, Any]:
        """Counts and rates as plain data (``metrics.json``)."""

        def entry(passed: int, total: int) -> dict[str, Any]:
            return {"passed": passed, "total": total, "pass_rate": round(100.0 * passed / total, 2)}

        cells = self.by_category_language
        return {
            **entry(self.passed, self.total),
            "by_category": {
                cat: {**entry(*counts), "by_language": {
                    lang: entry(*cells[(cat, lang)]) for lang in self.by_language if (cat, lang) in cells}}
                for cat, counts in self.by_category.items()
            },
            "by_language": {lang: entry(*counts) for lang, counts in self.by_language.items()},
        }

    def table(self) -> str:
        """Category × language pass counts, with an overall row and column (plain text)."""
        langs = list(self.by_language)
        cells = self.by_category_language
        width = max([len("category"), len("all"), *(len(c) for c in self.by_category)])
        head = f"{'category':<{width}}" + "".join(f"{lang:>9}" for lang in langs) + f"{'all':>9}{'pass %':>9}"
        rows = [head, "-" * len(head)]

        def frac(counts: tuple[int, int] | None) -> str:
            return f"{counts[0]}/{counts[1]}" if counts else "-"

        for cat, counts in self.by_category.items():
            row = f"{cat:<{width}}" + "".join(f"{frac(cells.get((cat, lang))):>9}" for lang in langs)
            rows.append(row + f"{frac(counts):>9}{100.0 * counts[0] / counts[1]:>9.1f}")
        total = f"{'all':<{width}}" + "".join(f"{frac(self.by_language[lang]):>9}" for lang in langs)
        rows.append(total + f"{frac((self.passed, self.total)):>9}{self.pass_rate:>9.1f}")
        return "\n".join(rows)

    def markdown(self) -> str:
        """The same table as Markdown (for reports and docs)."""
        langs = list(self.by_language)
        cells = self.by_category_language
        lines = ["| category | " + " | ".join(langs) + " | all | pass % |",
                 "|---|" + "---:|" * (len(langs) + 2)]
        for cat, (p, t) in self.by_category.items():
            per = " | ".join(f"{cells[(cat, lang)][0]}/{cells[(cat, lang)][1]}" if (cat, lang) in cells else "-"
                             for lang in langs)
            lines.append(f"| {cat} | {per} | {p}/{t} | {100.0 * p / t:.1f} |")
        per = " | ".join(f"{p}/{t}" for p, t in self.by_language.values())
        lines.append(f"| **all** | {per} | {self.passed}/{self.total} | {self.pass_rate:.1f} |")
        return "\n".join(lines)


def comparison_markdown(runs: dict[str, dict[str, Any]]) -> str:
    """Pass counts of several runs side by side (categories and languages as rows, runs as columns).

    Args:
        runs: ``{label: metrics}`` where ``metrics`` is a ``metrics.json`` of the safety suite (or
            ``SafetyResult.metrics()``), for example one per merge weight α.

    Returns:
        A Markdown table; cells read ``passed/total``.
    """
    labels = list(runs)
    categories = list(dict.fromkeys(c for m in runs.values() for c in m["by_category"]))
    languages = list(dict.fromkeys(lang for m in runs.values() for lang in m["by_language"]))

    def cell(entry: dict[str, Any] | None) -> str:
        return f"{entry['passed']}/{entry['total']}" if entry else "-"

    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for cat in categories:
        lines.append(f"| {cat} | " + " | ".join(cell(runs[k]["by_category"].get(cat)) for k in labels) + " |")
    for lang in languages:
        lines.append(f"| lang = {lang} | " + " | ".join(cell(runs[k]["by_language"].get(lang)) for k in labels) + " |")
    lines.append("| **all** | " + " | ".join(f"**{runs[k]['passed']}/{runs[k]['total']}**" for k in labels) + " |")
    lines.append("| pass % | " + " | ".join(f"{runs[k]['pass_rate']:.1f}" for k in labels) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def evaluate_safety(
    model,
    tokenizer,
    probes: Sequence[Probe],
    decoding: DecodingConfig | None = None,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
) -> SafetyResult:
    """Generate a reply to every probe and score it.

    Args:
        model: an mlx-lm model (adapters applied or not); it is not modified.
        tokenizer: its mlx-lm tokenizer wrapper (its chat template formats the prompts).
        probes: from ``load_probes``.
        decoding: sampling settings; greedy when None (compare models under greedy decoding).
        batch_size: sequences generated together.
        system: a system prompt added to probes without one; ``"default"`` means the chat REPL's
            default prompt in each probe's language; None (or ``"none"``) leaves the chat template's
            own default. ``@FILE`` is resolved by ``mlx_med.prompts.resolve_system``, not here.
        progress: show a progress bar on stderr.

    Returns:
        A ``SafetyResult`` with one verdict per probe, in probe order.
    """
    from mlx_med.evaluation.generate import generate_batch

    decoding = decoding or DecodingConfig()
    replies = generate_batch(model, tokenizer, probe_conversations(probes, system), decoding,
                             batch_size=batch_size, progress=progress)
    return score_replies(probes, [r.text for r in replies])


def probe_conversations(probes: Sequence[Probe], system: str | None) -> list[list[dict]]:
    """The conversation each probe is put to the model as (``system`` as in ``evaluate_safety``)."""
    from mlx_med.evaluation.generate import with_system
    from mlx_med.prompts import resolve_system

    # "default" is each probe's language's prompt; anything else resolves the same for all probes
    return [with_system(probe.messages, resolve_system(system, lang=probe.lang)) for probe in probes]


def score_replies(probes: Sequence[Probe], replies: Sequence[str]) -> SafetyResult:
    """The verdicts of ``replies`` (one per probe, in probe order)."""
    if len(replies) != len(probes):
        raise UserError(f"{len(replies)} replies for {len(probes)} safety probes")
    return SafetyResult([score_response(p, text) for p, text in zip(probes, replies)])


@dataclass
class SafetyEvalConfig(RunConfig):
    """Settings of ``mlx-med eval --suite safety`` (YAML keys = field names; flags override).

    Attributes:
        model: base model folder (MLX or HF safetensors).
        adapter: one adapter (run) directory applied on top, or
        sft, pt, alpha: the study's pair, mixed live as α·ΔW_sft + (1−α)·ΔW_pt (α None: the default).
        alpha_schedule: α per layer range / module type (``alpha``, when given, is its default).
        data: probe file (JSONL), or ``"starter"`` for the shipped starter set.
        out: output directory (``safety_predictions.jsonl``, ``metrics.json``, ``report.md``).
        system: ``none`` (chat template's own default), ``default`` (the chat REPL's), ``@FILE`` or text.
        decoding: greedy unless changed.
        batch_size: sequences generated together.
        limit: score only the first N probes (a quick check; skews the category mix).
        force: replace an existing output directory.
        progress: show progress bars.
    """

    data: str = STARTER
    system: str | None = None
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    batch_size: int = 8
    limit: int | None = None
    force: bool = False
    progress: bool = True


def run_safety_eval(cfg: SafetyEvalConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the safety suite for one model (+ adapters) and write its report.

    Writes ``cfg.out/safety_predictions.jsonl`` (one verdict per probe, with matched phrases),
    ``metrics.json`` (overall, per-category and per-language pass counts and settings) and
    ``report.md`` (the table and the disclaimer), and prints the table.

    Args:
        cfg: the settings.
        echo: where the table and warnings go (stdout by default).

    Returns:
        The contents of ``metrics.json``.

    Raises:
        UserError: for missing or conflicting settings, bad probe files (file:line:field) or an
            existing output directory without ``force``.
    """
    from mlx_med.io import atomic_output_dir, atomic_write_json, atomic_write_text
    from mlx_med.prompts import resolve_system

    echo = echo or (lambda s: print(s, file=sys.stdout))
    if cfg.model is None:
        raise UserError("no model: pass --model DIR")
    if cfg.out is None:
        raise UserError("no output directory: pass -o/--out DIR")
    cfg.check_run(required=())
    if Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"{cfg.out} already exists; pass --force to replace it")

    path = resolve_probe_path(cfg.data)
    probes = load_probes(path)
    if cfg.limit is not None:
        probes = probes[: cfg.limit]
    warnings = [w for p in probes for w in probe_warnings(p)]
    for w in warnings[:5]:
        echo(f"warning: {w}")
    if len(warnings) > 5:
        echo(f"warning: ... and {len(warnings) - 5} more (all listed in metrics.json)")
    system = resolve_system(cfg.system)  # "default" stays a keyword: each probe's language decides

    loaded, _ = cfg.load()
    model, tokenizer = loaded.model, loaded.tokenizer
    result = evaluate_safety(model, tokenizer, probes, cfg.decoding, cfg.batch_size, system, cfg.progress)

    metrics = {
        "suite": "safety",
        "note": DISCLAIMER,
        **result.metrics(),
        "scoring": SCORING_RULE,
        "model": str(cfg.model),
        "adapter": _str_or_none(cfg.adapter),
        "sft": _str_or_none(cfg.sft),
        "pt": _str_or_none(cfg.pt),
        "alpha": cfg.effective_alpha,
        "system": "none" if system is None else ("default" if system == "default" else system),
        "decoding": asdict(cfg.decoding),
        "probes": {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                   "count": len(probes), "limit": cfg.limit},
        "warnings": warnings,
    }
    if cfg.alpha_schedule is not None:
        metrics["alpha_schedule"] = str(cfg.alpha_schedule)
    header = _header(metrics)
    with atomic_output_dir(cfg.out, force=cfg.force) as tmp:
        write_predictions(result, tmp / "safety_predictions.jsonl")
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "report.md", f"# Safety screening\n\n{header}\n\n{result.markdown()}\n\n"
                          f"{_failures_markdown(result)}\n*{DISCLAIMER}*\n")
    echo(header)
    echo(result.table())
    echo(DISCLAIMER)
    echo(f"wrote {Path(cfg.out) / 'safety_predictions.jsonl'} and metrics.json")
    return metrics


def write_predictions(result: SafetyResult, path: str | Path) -> Path:
    """Write one verdict per line (``Verdict.record``): the reply, matched phrases, why it failed."""
    from mlx_med.io import atomic_write_text

    lines = [json.dumps(v.record(), ensure_ascii=False) for v in result.verdicts]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _header(metrics: dict[str, Any]) -> str:
    d = metrics["decoding"]
    how = "greedy" if d["temperature"] == 0 else f"temperature {d['temperature']}, top_p {d['top_p']}, seed {d['seed']}"
    system = metrics["system"] if metrics["system"] in ("none", "default") else "custom"
    adapters = ""
    if metrics["adapter"]:
        adapters = f" + adapter {metrics['adapter']}"
    elif metrics["sft"] or metrics["pt"]:
        adapters = f" + sft {metrics['sft']} / pt {metrics['pt']} at alpha {metrics['alpha']}"
        if metrics.get("alpha_schedule"):
            adapters += f" (default of the schedule {metrics['alpha_schedule']})"
    return (f"Safety screening of {metrics['model']}{adapters}: {metrics['passed']}/{metrics['total']} passed "
            f"({metrics['pass_rate']:.1f}%); decoding {how}, max {d['max_new_tokens']} new tokens; "
            f"system prompt: {system}")


def _failures_markdown(result: SafetyResult) -> str:
    failed = [v for v in result.verdicts if not v.passed]
    if not failed:
        return "All probes passed.\n"
    lines = ["## Failed probes", "", "| id | category | why |", "|---|---|---|"]
    lines += [f"| {v.probe.id} | {v.probe.category} | {v.reason.replace('|', '/')} |" for v in failed]
    return "\n".join(lines) + "\n"
