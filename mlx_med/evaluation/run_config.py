"""What every eval run shares, whatever the suite (QA, safety, MCQ; perplexity rides along with QA).

One model choice (``--model`` + ``--adapter DIR`` or ``--sft RUN --pt RUN`` with ``--alpha A`` and/or
``--alpha-schedule FILE.yaml``), one input, one output folder. Each suite's config extends ``RunConfig`` with its own knobs; ``check`` and ``load``
are the one place where the shared part is validated and the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_med.adapters.mix import check_mix_flags
from mlx_med.adapters.schedule import effective_alpha
from mlx_med.errors import ConfigError


@dataclass
class RunConfig:
    """The model and its adapters, the input file and the output folder of one eval run."""

    model: Path | None = None  # base model folder (MLX or HF safetensors)
    data: Any = None  # the suite's input file
    out: Path | None = None  # output folder
    adapter: Path | None = None  # one adapter / training run dir
    sft: Path | None = None  # SFT adapter, mixed live with `pt` at weight `alpha`
    pt: Path | None = None
    alpha: float | None = None  # ΔW = α·ΔW_sft + (1−α)·ΔW_pt; None: the schedule's default or DEFAULT_ALPHA
    alpha_schedule: Path | None = None  # α per layer range / module type (``alpha``, when given, is its default)

    def check_run(self, required: tuple[str, ...] = ("model", "data", "out")) -> None:
        """Raise ``ConfigError`` for a missing required setting or ``UserError`` for bad adapter flags."""
        for name in required:
            if getattr(self, name) is None:
                raise ConfigError(f"eval needs '{name}' (flag --{name.replace('_', '-')} or the YAML key)")
        check_mix_flags(self.adapter, self.sft, self.pt, self.alpha, schedule=self.alpha_schedule)
        for name in ("batch_size",):
            value = getattr(self, name, 1)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        limit = getattr(self, "limit", None)
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")

    @property
    def mixes_pair(self) -> bool:
        """True when the SFT/PT pair is mixed live (α applies)."""
        return self.sft is not None or self.pt is not None

    @property
    def effective_alpha(self) -> float | None:
        """The α this run records: ``alpha``, else the schedule's default, else ``DEFAULT_ALPHA`` (None
        without the pair)."""
        return effective_alpha(self.alpha, self.alpha_schedule) if self.mixes_pair else None

    def adapter_fingerprint(self) -> dict[str, Any]:
        """Model, adapters and α as they decide a result (resuming and caching compare these)."""
        from mlx_med.fingerprint import model_fingerprint, path_fingerprint

        adapters = {k: v for k, v in (("adapter", self.adapter), ("sft", self.sft), ("pt", self.pt)) if v is not None}
        state = {
            "model": model_fingerprint(self.model),
            "adapters": {k: path_fingerprint(v) for k, v in adapters.items()},
            "alpha": self.effective_alpha,
        }
        if self.alpha_schedule is not None:  # only then, so earlier runs' states still match
            state["alpha_schedule"] = path_fingerprint(self.alpha_schedule)
        return state

    def load(self):
        """Model + tokenizer with the adapters attached live (α can change later without re-fusing).

        Returns:
            ``(loaded, live)``: a ``LoadedModel`` and the ``LiveAdapters`` handle (None without adapters).
        """
        return load_for_eval(self.model, self.adapter, self.sft, self.pt, self.alpha, self.alpha_schedule)


def load_for_eval(model: Path, adapter: Path | None = None, sft: Path | None = None,
                  pt: Path | None = None, alpha: float | None = None, alpha_schedule: Path | None = None):
    """Model + tokenizer with adapters applied live; prints the loader's notes (base mismatch, stacking).

    Returns:
        ``(loaded, live)``: a ``LoadedModel`` and the ``LiveAdapters`` handle (None without adapters).
    """
    from mlx_med.adapters.live import load_with_adapters, print_notes

    loaded, live = load_with_adapters(model, adapter=adapter, sft=sft, pt=pt, alpha=alpha,
                                      alpha_schedule=alpha_schedule)
    print_notes(live)
    return loaded, live


def fused_from(model_dir: Path) -> dict[str, Any] | None:
    """How a fused model folder was made (adapters and their weights, from its ``fuse_report.json``), or None."""
    import json

    path = Path(model_dir) / "fuse_report.json"  # written by mlx_med.adapters.fuse (its REPORT_FILE)
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    fused = {"base": report.get("base"), "adapters": report.get("adapters"), "weights": report.get("weights")}
    if report.get("alpha_schedule"):
        fused["alpha_schedule"] = report["alpha_schedule"]
    return fused
