"""The pipeline's YAML, as dataclasses: where the base comes from, the two training phases, the fuse,
eval, sweep and inspect stages (``mlx-med pipeline -c configs/demo.yaml``), and their cross-field checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_med.errors import ConfigError, UserError
from mlx_med.train.config import TrainConfig

EMBEDDED = "embedded"


@dataclass
class BaseModelConfig:
    """Where the base model comes from: one of ``model`` (an MLX folder), ``hf_path`` or ``gguf``."""

    gguf: str | None = EMBEDDED  # a .gguf path, or "embedded" = the SmolLM2-135M-Instruct demo GGUF
    hf_path: Path | None = None  # a local Hugging Face folder, converted (and quantized with q_bits)
    model: Path | None = None  # an MLX folder already converted: no conversion stage
    q_bits: int | None = None  # quantize an HF base (4 or 8); GGUF weights keep their own quantization
    q_group_size: int = 64


@dataclass
class FuseStageConfig:
    """The study's weighted merge: ΔW = α·ΔW_sft + (1−α)·ΔW_pt, fused into the base and exported."""

    alpha: float | None = None  # None: mlx_med.adapters.mix.DEFAULT_ALPHA (or the schedule's default)
    alpha_schedule: Path | None = None  # α per layer range / module type (alpha, if given, is its default)
    merge_method: str = "linear"  # the merged adapter written beside the fused model
    dtype: str = "bfloat16"  # fused weights
    export_dtype: str = "bfloat16"  # the Hugging Face checkpoint


@dataclass
class EvalStageConfig:
    """QA evaluation of the base and the fused model on each eval set, under each decoding preset."""

    data: list[Path] = field(default_factory=list)
    presets: list[str] = field(default_factory=lambda: ["greedy", "llamafactory"])
    limit: int | None = 16
    batch_size: int = 8
    max_new_tokens: int = 128
    ppl_data: Path | None = None  # held-out PT text: perplexity of base vs fused
    ppl_limit: int = 40
    ppl_block_size: int = 256
    safety_probes: str | None = "starter"  # safety suite on base and fused; None = skip
    mcq_data: list[Path] = field(default_factory=list)  # MCQ sets scored on base and fused; [] = skip
    mcq_limit: int | None = 16  # first N items of each MCQ set


@dataclass
class SweepStageConfig:
    """Live-α sweep (QA + held-out perplexity + safety) and an optional decoding sweep on the fused model."""

    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    data: Path | None = None  # defaults to the first eval set
    limit: int | None = 16
    max_new_tokens: int = 96
    # Rows decoded together in the α sweep, its search and the decoding sweep (None: eval.batch_size).
    # The sweep's mixed batch takes this many rows per point, up to 64 in all (alpha_batch).
    batch_size: int | None = None
    safety_probes: str | None = "starter"
    decoding_grid: dict[str, Any] = field(default_factory=dict)  # e.g. {temperature: [0, 0.7]}; {} = skip
    mcq_data: Path | None = None  # MCQ accuracy at each α (and in the search)
    mcq_limit: int | None = 16
    search_budget: int = 0  # > 0: also search α (same folder, points reused); 0 = skip
    search_objective: str | None = None  # default: rouge-l (accuracy without a QA set)
    search_constraints: list[str] = field(default_factory=list)  # e.g. ["safety>=base", "ppl<=1.05*pt"]


@dataclass
class InspectStageConfig:
    """Where the SFT and PT adapters interfere (``mlx-med inspect``), with a suggested α schedule."""

    enabled: bool = True
    alpha: float | None = None  # the merge α for the cancellation columns; None = fuse.alpha
    top_fraction: float = 0.2  # share of entries by magnitude counted as "large" for the sign conflict


@dataclass
class PipelineConfig:
    output: Path = Path("runs/demo")
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    pt: TrainConfig = field(default_factory=TrainConfig)  # phases: set by __post_init__
    sft: TrainConfig = field(default_factory=TrainConfig)
    fuse: FuseStageConfig = field(default_factory=FuseStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    sweep: SweepStageConfig = field(default_factory=SweepStageConfig)
    inspect: InspectStageConfig = field(default_factory=InspectStageConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # The section decides the phase (a YAML section built from TrainConfig's defaults would say "pt"
        # for both), so pipeline.json records what each stage trains.
        self.pt = replace(self.pt, phase="pt")
        self.sft = replace(self.sft, phase="sft")

    def check(self) -> None:
        sources = [s for s in (self.base.model, self.base.hf_path) if s is not None]
        if len(sources) > 1:
            raise ConfigError("base: give one of 'model', 'hf_path' or 'gguf'")
        if self.pt.data.train is None or self.sft.data.train is None:
            raise ConfigError("pipeline needs 'pt.data.train' and 'sft.data.train'")
        if not self.eval.data:
            raise ConfigError("pipeline needs at least one file in 'eval.data'")
        from mlx_med.adapters.schedule import check_alpha, load_schedule

        try:
            if self.fuse.alpha is not None:
                check_alpha(self.fuse.alpha, "fuse.alpha")
            if self.fuse.alpha_schedule is not None:
                load_schedule(self.fuse.alpha_schedule)  # bad rules fail before any stage runs
        except UserError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 < self.inspect.top_fraction <= 1.0:
            raise ConfigError(f"inspect.top_fraction must be in (0, 1], got {self.inspect.top_fraction}")
        for name, size in (("eval.batch_size", self.eval.batch_size), ("sweep.batch_size", self.sweep.batch_size)):
            if size is not None and size < 1:
                raise ConfigError(f"{name} must be >= 1, got {size}")
