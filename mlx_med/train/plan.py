"""Predict the peak memory of a LoRA / QLoRA training step from ``config.json`` alone.

Pure arithmetic: no model is loaded and mlx is not imported (the backend is passed in or detected
lazily by the caller). The peak is the sum of four parts that are all alive at the start of the
backward pass:

* **base weights** - frozen. On Metal/CUDA (``gpu``) a quantized base stays quantized (QLoRA):
  ``bits/8`` bytes per weight plus an fp16 scale and bias per group; unquantized weights and norms
  are bf16. On the MLX CPU backend mlx-med dequantizes everything to fp32 (4 bytes per parameter),
  because quantized and bf16 matmuls run ~50x slower there (``mlx_med.backend``).
* **LoRA** - ``rank·(in+out)`` fp32 parameters per adapted linear, plus their gradients and the two
  AdamW moments (16 bytes per parameter; 4 more while gradients are accumulated over micro-batches).
* **activations** - what autodiff keeps per adapted block for the backward pass. Blocks below the
  lowest adapted one keep nothing (no gradient flows there). With gradient checkpointing only each
  block's input is kept, plus one block's activations while it is recomputed.
* **logits** - ``batch·seq·vocab`` in the compute dtype, times four: the logits, the softmax that
  cross-entropy's backward makes, and two gradient buffers (measured 3.7-4.0 copies with the masked
  cross-entropy mlx-med and mlx-lm use). This dominates small models with big vocabularies.

The per-token activation coefficients were measured on MLX 0.32 (CPU backend) by differencing peak
memory between 1- and 3-block models while varying one dimension at a time; see docs/plan.md and
``scripts/validate_plan.py``, which compares whole estimates with measured ``mx.get_peak_memory()``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlx_med.errors import ConfigError, UserError
from mlx_med.train.config import match_target_modules

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_BYTES = 4  # mlx-lm creates lora_a / lora_b in fp32 whatever the base dtype
SCALE_BYTES = 2  # MLX affine quantization stores one fp16/bf16 scale and one bias per group
LOGIT_COPIES = 4
# Saved for the backward pass, per token of one adapted block, in the compute dtype (the LoRA
# inputs are counted separately, below): measured coefficients of hidden, q/o width, k/v width,
# intermediate, and (heads x sequence) for the attention probabilities and their gradient.
ACT_HIDDEN, ACT_Q, ACT_KV, ACT_FFN, ACT_ATTN = 1.5, 1.0, 4.0, 2.0, 2.0
ATTENTION_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_TARGETS = ATTENTION_MODULES + MLP_MODULES
FIT_SIZES_GB = (16, 24, 32, 64)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0}
# Dense decoders with q/k/v/o + gate/up/down blocks: the shape the formulas describe.
KNOWN_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a llama/qwen2-style decoder, read from ``config.json``."""

    source: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    stored_bits: int | None = None  # from the MLX ``quantization`` block, None = not quantized
    stored_group_size: int | None = None
    module_quant: dict[str, Any] = field(default_factory=dict)  # per-module overrides in that block

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each linear layer of one block, keyed by its path inside the block."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (h, self.q_dim), "self_attn.k_proj": (h, self.kv_dim),
            "self_attn.v_proj": (h, self.kv_dim), "self_attn.o_proj": (self.q_dim, h),
            "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h),
        }

    def parameter_count(self) -> int:
        """All parameters, counting tied embeddings once."""
        block = sum(i * o for i, o in self.linears().values()) + 2 * self.hidden_size
        if self.qkv_bias:
            block += self.q_dim + 2 * self.kv_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * block + self.vocab_size * self.hidden_size + head + self.hidden_size


def read_model_shape(path: str | Path) -> ModelShape:
    """Read a model folder's ``config.json`` (or a ``config.json`` file itself).

    Raises:
        UserError: the file is missing or not JSON.
        ConfigError: a key the estimate needs is missing or not a positive integer.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise UserError(f"{path}: no config.json (is this a model folder?)")
        raise UserError(f"model config not found: {path} (give a model folder or its config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: the top level must be a JSON object")
    return shape_from_config(config, str(file))


def shape_from_config(config: dict[str, Any], source: str = "<config>") -> ModelShape:
    """A ``ModelShape`` from a parsed HF/MLX config (``text_config`` is used when present)."""
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the LM inside
        config = {**config["text_config"], "quantization": config.get("quantization")}

    def need(key: str) -> int:
        value = config.get(key)
        if value is None:
            raise ConfigError(f"{source}: missing '{key}', which the memory estimate needs")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: '{key}' must be a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv_heads = need("num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
    head_dim = need("head_dim") if config.get("head_dim") is not None else hidden // heads
    model_type = str(config.get("model_type", "unknown"))
    quant = config.get("quantization") or config.get("quantization_config")
    bits = group = None
    overrides: dict[str, Any] = {}
    if isinstance(quant, dict) and "bits" in quant:
        bits, group = int(quant["bits"]), int(quant.get("group_size", 64))
        overrides = {k: v for k, v in quant.items() if isinstance(v, (dict, bool))}
    return ModelShape(
        source=source, model_type=model_type, hidden_size=hidden,
        intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=need("vocab_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        stored_bits=bits, stored_group_size=group, module_quant=overrides,
    )


@dataclass
class PlanSettings:
    """The training settings that move peak memory (names follow ``TrainConfig``)."""

    q_bits: int | None = None  # None = as stored in config.json; 0 = not quantized
    q_group_size: int = 64
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # compute dtype on the GPU path
    batch_size: int = 4
    max_seq_len: int = 512
    lora_rank: int = 8
    lora_layers: int = -1  # last N blocks; -1 = all
    target_modules: list[str] = field(default_factory=list)  # empty = every attention + MLP linear
    lora_dropout: float = 0.0
    grad_checkpoint: bool = False
    grad_accumulation: int = 1
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"

    def check(self, shape: ModelShape) -> None:
        """Raise ``ConfigError`` naming the setting for values that cannot work."""
        for name in ("batch_size", "max_seq_len", "lora_rank", "grad_accumulation", "q_group_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        if self.q_bits is not None and self.q_bits not in (0, 2, 3, 4, 5, 6, 8):
            raise ConfigError(f"'q_bits' must be 2, 3, 4, 5, 6 or 8 (0 = not quantized), got {self.q_bits}")
        if self.lora_layers == 0 or self.lora_layers < -1 or self.lora_layers > shape.num_layers:
            raise ConfigError(f"'lora_layers' must be -1 (all) or 1..{shape.num_layers} for this model, "
                              f"got {self.lora_layers}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        resolve_targets(self.target_modules)


def settings_from_recipe(cfg: Any, overrides: dict[str, Any] | None = None) -> PlanSettings:
    """``PlanSettings`` from a training recipe (a ``TrainConfig``), with non-None ``overrides`` on top.

    The one mapping of training settings to planner settings (``mlx-med plan -c RECIPE``).
    """
    recipe = {"batch_size": cfg.optim.batch_size, "max_seq_len": cfg.max_seq_len, "lora_rank": cfg.lora.rank,
              "lora_layers": cfg.lora.num_layers, "target_modules": list(cfg.lora.target_modules),
              "lora_dropout": cfg.lora.dropout, "grad_checkpoint": cfg.grad_checkpoint,
              "grad_accumulation": cfg.optim.grad_accumulation}
    return PlanSettings(**{**recipe, **{k: v for k, v in (overrides or {}).items() if v is not None}})


def resolve_targets(requested: list[str]) -> list[str]:
    """Block-relative module paths for ``q_proj`` / ``self_attn.q_proj`` style names (empty = all)."""
    return match_target_modules(requested, list(DEFAULT_TARGETS))


@dataclass
class Part:
    name: str
    bytes: float
    detail: str


@dataclass
class MemoryPlan:
    """The estimate: parts that add up to ``peak_bytes``, and what was assumed."""

    shape: ModelShape
    settings: PlanSettings
    device: str  # "gpu" or "cpu"
    compute_dtype: str
    weights_policy: str
    lora_params: int
    parts: list[Part]
    activations_off: float  # bytes without gradient checkpointing
    activations_on: float  # bytes with it

    @property
    def peak_bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


def usable_fraction(device: str, ram_gb: float) -> float:
    """Share of a machine's RAM a training process can count on.

    Apple silicon (``gpu``): macOS lets the GPU wire about 2/3 of unified memory on machines up to
    36 GB and about 3/4 above (``recommendedMaxWorkingSetSize``; raisable with
    ``sudo sysctl iogpu.wired_limit_mb=...``). CPU backend: RAM less ~15% for the OS and the process.
    """
    if device == "gpu":
        return 2 / 3 if ram_gb <= 36 else 3 / 4
    return 0.85


def fit_table(plan: MemoryPlan, sizes_gb: tuple[int, ...] = FIT_SIZES_GB) -> list[tuple[int, float, str]]:
    """``(RAM GB, usable GB, verdict)`` rows; verdict is ``fits``, ``tight`` (>90% of usable) or ``no``."""
    rows = []
    for size in sizes_gb:
        usable = size * usable_fraction(plan.device, size)
        need = plan.peak_gb
        verdict = "fits" if need <= 0.9 * usable else "tight" if need <= usable else "no"
        rows.append((size, usable, verdict))
    return rows


def estimate(shape: ModelShape, settings: PlanSettings, device: str) -> MemoryPlan:
    """Peak memory of one LoRA training step of ``shape`` under ``settings`` on ``device``.

    Args:
        shape: the model's architecture numbers (``read_model_shape``).
        settings: batch, sequence, LoRA and quantization settings.
        device: ``"gpu"`` (Metal/CUDA: quantized base kept, bf16 compute) or ``"cpu"`` (MLX CPU
            backend: base dequantized to fp32, fp32 compute).

    Raises:
        ConfigError: a setting that cannot work for this model.
    """
    if device not in ("gpu", "cpu"):
        raise ConfigError(f"device must be 'gpu' or 'cpu', got {device!r}")
    settings.check(shape)
    if device == "cpu":
        compute = "float32"
    else:
        compute = "bfloat16" if settings.dtype in ("auto", "bfloat16") else settings.dtype
    c = DTYPE_BYTES[compute]
    bits, group = _quantization(shape, settings)
    weights, policy = _weights(shape, device, compute, bits, group, as_stored=settings.q_bits is None)
    targets = resolve_targets(settings.target_modules)
    n_lora_layers = shape.num_layers if settings.lora_layers == -1 else settings.lora_layers
    lora_params = n_lora_layers * settings.lora_rank * sum(sum(shape.linears()[t]) for t in targets)
    per_param = LORA_BYTES * (2 + OPTIMIZER_STATES[settings.optimizer] + (settings.grad_accumulation > 1))
    tokens = settings.batch_size * settings.max_seq_len

    block = _block_activation_bytes(shape, settings, targets, c) * tokens
    act_off = n_lora_layers * block
    act_on = n_lora_layers * tokens * shape.hidden_size * c + block
    logits = LOGIT_COPIES * tokens * shape.vocab_size * c

    states = {"adamw": "AdamW m+v", "adam": "Adam m+v", "sgd": "no optimizer state"}[settings.optimizer]
    ckpt = settings.grad_checkpoint
    parts = [
        Part("base weights", weights, policy),
        Part("LoRA", lora_params * per_param,
             f"{lora_params / 1e6:.2f}M params x {per_param} B (fp32 params + grads + {states}"
             + (" + accumulated grads" if settings.grad_accumulation > 1 else "") + ")"),
        Part("activations", act_on if ckpt else act_off,
             f"{n_lora_layers} adapted block(s), grad checkpointing {'on' if ckpt else 'off'} "
             f"(off: {act_off / GB:.2f} GB, on: {act_on / GB:.2f} GB)"),
        Part("logits", logits,
             f"{settings.batch_size}x{settings.max_seq_len}x{shape.vocab_size} {compute} x {LOGIT_COPIES} "
             "(logits, softmax, grads of cross-entropy)"),
    ]
    return MemoryPlan(shape, settings, device, compute, policy, lora_params, parts, act_off, act_on)


def _quantization(shape: ModelShape, settings: PlanSettings) -> tuple[int | None, int]:
    if settings.q_bits is None:
        return shape.stored_bits, shape.stored_group_size or settings.q_group_size
    return (settings.q_bits or None), settings.q_group_size


def _weights(shape: ModelShape, device: str, compute: str, bits: int | None, group: int,
             as_stored: bool) -> tuple[float, str]:
    """Bytes of the frozen base, and a one-line description of how it is held."""
    h, v = shape.hidden_size, shape.vocab_size
    small = shape.num_layers * (2 * h + (shape.q_dim + 2 * shape.kv_dim if shape.qkv_bias else 0)) + h
    if device == "cpu":
        note = f", stored {bits}-bit" if bits else ""
        return 4.0 * shape.parameter_count(), f"fp32, dequantized for the MLX CPU backend{note}"
    c = DTYPE_BYTES[compute]
    def matrix(path: str, rows: int, cols: int) -> float:
        b, g = bits, group
        if as_stored and path in shape.module_quant:  # per-module override in the MLX config
            spec = shape.module_quant[path]
            b, g = (spec.get("bits", b), spec.get("group_size", g)) if isinstance(spec, dict) else (None, g)
        if not b or cols % g:  # mlx-lm leaves layers whose width is not a multiple of the group
            return rows * cols * c
        return rows * cols * b / 8 + rows * (cols // g) * 2 * SCALE_BYTES

    total = small * c
    for i in range(shape.num_layers):
        for name, (n_in, n_out) in shape.linears().items():
            total += matrix(f"model.layers.{i}.{name}", n_out, n_in)
    total += matrix("model.embed_tokens", v, h)
    if not shape.tie_word_embeddings:
        total += matrix("lm_head", v, h)
    policy = f"{bits}-bit, group {group} (QLoRA), norms {compute}" if bits else f"{compute}, not quantized"
    return total, policy


def _block_activation_bytes(shape: ModelShape, settings: PlanSettings, targets: list[str], c: int) -> float:
    """Bytes one adapted block keeps for the backward pass, per token."""
    h, f = shape.hidden_size, shape.intermediate_size
    saved = (ACT_HIDDEN * h + ACT_Q * shape.q_dim + ACT_KV * shape.kv_dim + ACT_FFN * f
             + ACT_ATTN * shape.num_heads * settings.max_seq_len) * c
    # The LoRA branch keeps its input for lora_a's gradient. In fp32 compute with no dropout the
    # modules that read the same tensor share it; otherwise each keeps its own copy (an fp32 cast
    # when the compute dtype is 16-bit, the dropped-out input when dropout is on).
    ins = {t: shape.linears()[t][0] for t in targets}
    if c == LORA_BYTES and settings.lora_dropout == 0:
        groups = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "o": ("self_attn.o_proj",), "mlp": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
        lora_in = sum(max(ins.get(m, 0) for m in members) for members in groups.values()) * c
    else:
        lora_in = sum(ins.values()) * LORA_BYTES
        if settings.lora_dropout > 0:
            lora_in += sum(ins.values()) * (1 + (c if c != LORA_BYTES else 0))  # bool mask (+ 16-bit copy)
    return saved + lora_in


def format_plan(plan: MemoryPlan) -> str:
    """The human-readable estimate; its ``peak: <number> GB`` line is the CLI contract."""
    s, m = plan.settings, plan.shape
    accel = "Metal/CUDA" if plan.device == "gpu" else "MLX CPU backend"
    lines = [
        f"model: {m.source} ({m.model_type}, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"vocab {m.vocab_size}, {m.parameter_count() / 1e9:.3f}B params)",
        f"backend: {plan.device} ({accel}), compute {plan.compute_dtype}; base weights {plan.weights_policy}",
        f"training: batch {s.batch_size} x seq {s.max_seq_len}, LoRA rank {s.lora_rank} on "
        f"{len(resolve_targets(s.target_modules))} module(s) x "
        f"{m.num_layers if s.lora_layers == -1 else s.lora_layers} layer(s), {s.optimizer}, "
        f"grad checkpointing {'on' if s.grad_checkpoint else 'off'}"
        + (f", {s.grad_accumulation} micro-batches" if s.grad_accumulation > 1 else ""),
    ]
    if m.model_type not in KNOWN_TYPES:
        lines.append(f"note: model_type {m.model_type!r} is estimated as a llama-style dense decoder "
                     f"(the formulas fit {', '.join(KNOWN_TYPES)})")
    lines.append("")
    width = max(len(p.name) for p in plan.parts)
    for p in plan.parts:
        lines.append(f"  {p.name:<{width}}  {p.bytes / GB:8.3f} GB  {p.detail}")
    lines.append(f"peak: {plan.peak_gb:.2f} GB")
    other = plan.activations_off if s.grad_checkpoint else plan.activations_on
    alt = plan.peak_bytes - plan.part("activations").bytes + other
    lines.append(f"  (with grad checkpointing {'off' if s.grad_checkpoint else 'on'}: {alt / GB:.2f} GB)")
    lines.append("")
    head = "fits in" if plan.device == "gpu" else "fits in (CPU RAM)"
    lines.append(f"{head}:  " + "   ".join(
        f"{size} GB: {verdict} ({usable:.1f} usable)" for size, usable, verdict in fit_table(plan)))
    if plan.device == "gpu":
        lines.append("  usable = what macOS lets the GPU wire by default: ~2/3 of RAM up to 36 GB, ~3/4 above")
    else:
        lines.append("  usable = 85% of RAM (the rest for the OS and the Python process)")
    return "\n".join(lines)
