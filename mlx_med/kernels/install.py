"""Where the kernels go in an mlx-lm model. Three ways in, each leaving anything the kernels do not
take (GPU streams, other dtypes, quantized KV caches, attention sinks, traditional or scaled-frequency
RoPE) to MLX and mlx-lm's own code, so installing them never changes what a model computes:

- ``install``: the model module's ``swiglu`` and ``scaled_dot_product_attention`` (the names
  mlx-lm's llama/qwen2/qwen3 modules call), rebound to drop-ins;
- ``install_layers``: the model's ``nn.RMSNorm`` and ``nn.RoPE`` layers given subclasses (same
  parameters) whose forward and gradient are the kernels';
- ``install_generation``: the ``logsumexp`` mlx-lm's batch generator normalizes every step with.

``uninstall`` takes all three back (benchmarks compare both in one run).
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import mlx.core as mx
import mlx.nn as nn

from mlx_med.kernels.ops import Kernels, attention, on_cpu_f32

ORIGINALS = "__mlx_med_kernels_originals__"  # set on a module while the kernels are in it


def model_functions(kernels: Kernels, module) -> dict:
    """Drop-in replacements for a model module's ``swiglu`` and ``scaled_dot_product_attention``, for
    each name that *is* mlx-lm's shared function (a module defining its own, e.g. a clipped SwiGLU,
    keeps it)."""
    from mlx_lm.models import activations, base

    original_swiglu = getattr(module, "swiglu", None)
    original_sdpa = getattr(module, "scaled_dot_product_attention", None)
    if original_swiglu is not activations.swiglu:
        original_swiglu = None
    if original_sdpa is not base.scaled_dot_product_attention:
        original_sdpa = None
    replaced = {}
    if original_swiglu is not None:
        def swiglu(gate, x):
            if on_cpu_f32(gate, x) and gate.shape == x.shape:
                return kernels.swiglu(gate, x)
            return original_swiglu(gate, x)

        replaced["swiglu"] = swiglu
    if original_sdpa is not None:
        def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
            if sinks is None and not hasattr(cache, "bits") and on_cpu_f32(queries, keys, values) and (
                    mask is None or (isinstance(mask, str) and mask == "causal")
                    or (isinstance(mask, mx.array) and mask.dtype in (mx.bool_, mx.float32) and mask.ndim <= 4)):
                return attention(kernels, queries, keys, values, scale, mask, cached=cache is not None)
            return original_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

        replaced["scaled_dot_product_attention"] = scaled_dot_product_attention
    return replaced


def install(model: nn.Module, kernels: Kernels) -> list[str]:
    """Route a model's SwiGLU and attention through the kernels. mlx-lm's model modules call these two
    by module-level name, so the names are rebound in the module that defines the model's class, once
    (every model of that architecture in this process shares it; the originals are kept for
    ``uninstall``). Returns the names rebound."""
    module = sys.modules[type(model).__module__]
    if not hasattr(module, ORIGINALS):
        replaced = model_functions(kernels, module)
        setattr(module, ORIGINALS, {name: getattr(module, name) for name in replaced})
        for name, function in replaced.items():
            setattr(module, name, function)
    return sorted(getattr(module, ORIGINALS))


def routes_attention(model: nn.Module) -> bool:
    """Whether ``model``'s attention runs through the kernels (``install`` rebound it in its module)."""
    module = sys.modules.get(type(model).__module__)
    return "scaled_dot_product_attention" in getattr(module, ORIGINALS, {})


class KernelRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose fp32 CPU forward and gradients are the kernels' (MLX's otherwise)."""

    kernels: Kernels  # set on the class ``layer_classes`` makes

    def __call__(self, x):
        weight = self["weight"]
        if on_cpu_f32(x, weight) and x.ndim >= 1:
            return self.kernels.rms_norm(self.eps)(x, weight)
        return super().__call__(x)


class KernelRoPE(nn.RoPE):
    """``nn.RoPE`` whose fp32 CPU forward and gradient are the kernels' for the non-traditional
    layout on ``(B, N, T, D)`` inputs (MLX's otherwise)."""

    kernels: Kernels  # set on the class ``layer_classes`` makes

    def __call__(self, x, offset=0):
        if not self.traditional and x.ndim == 4 and on_cpu_f32(x):
            offsets = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)
            if (offsets.ndim <= 1 and offsets.size in (1, x.shape[0])
                    and mx.issubdtype(offsets.dtype, mx.integer)):
                return self.kernels.rope(self.dims, self.base, self.scale)(x, offsets.astype(mx.int32))
        return super().__call__(x, offset)


@functools.cache
def layer_classes(kernels: Kernels) -> dict[type, type]:
    """MLX layer class -> its subclass on ``kernels`` (one pair per kernels object)."""
    return {base: type(base.__name__, (sub,), {"kernels": kernels, "__module__": __name__})
            for base, sub in ((nn.RMSNorm, KernelRMSNorm), (nn.RoPE, KernelRoPE))}


def install_layers(model: nn.Module, kernels: Kernels) -> list[str]:
    """Give every ``nn.RMSNorm`` and ``nn.RoPE`` of ``model`` (exactly those classes: a subclass
    with its own arithmetic is left alone) its kernels subclass, in place; parameters are
    untouched. Returns the layer kinds now on the kernels."""
    classes = layer_classes(kernels)
    kinds = set()
    for _, layer in model.named_modules():
        if type(layer) in classes:
            layer.__class__ = classes[type(layer)]
        if isinstance(layer, (KernelRMSNorm, KernelRoPE)):
            kinds.add("RMSNorm" if isinstance(layer, KernelRMSNorm) else "RoPE")
    return sorted(kinds)


class CoreWithKernels(types.ModuleType):
    """``mlx.core`` as mlx-lm's generate module sees it once the kernels are in: every name is MLX's
    except ``logsumexp``, which takes the kernels for a last-axis fp32 reduction on the CPU. mlx-lm's
    ``BatchGenerator`` normalizes every decode step's vocabulary-wide logits with it (there is no hook
    to pass another), and MLX's CPU logsumexp costs as much as a seventh of a batched step."""

    def __init__(self, kernels: Kernels):
        super().__init__(mx.__name__, mx.__doc__)
        self._kernels = kernels

    def __getattr__(self, name: str):
        return getattr(mx, name)

    def logsumexp(self, a, axis=None, keepdims: bool = False, *, stream=None):
        if (stream is None and isinstance(axis, int) and a.ndim >= 1 and axis in (-1, a.ndim - 1)
                and a.shape[-1] > 0 and on_cpu_f32(a)):
            out = self._kernels.logsumexp(a)
            return out if keepdims else out.squeeze(-1)
        return mx.logsumexp(a, axis=axis, keepdims=keepdims, stream=stream)


def generate_module() -> types.ModuleType:
    """The module ``mlx_lm.generate`` (the package's attribute of that name is its function)."""
    return importlib.import_module("mlx_lm.generate")


def install_generation(kernels: Kernels) -> bool:
    """Give mlx-lm's generate module the kernels' logsumexp (``CoreWithKernels``), once per process and
    only while its ``mx`` is ``mlx.core`` itself. Returns whether it is in."""
    generate = generate_module()
    if generate.mx is mx:
        setattr(generate, ORIGINALS, {"mx": mx})
        generate.mx = CoreWithKernels(kernels)
    return isinstance(generate.mx, CoreWithKernels)


def packed_pairs() -> tuple:
    from mlx_med.kernels.packed import PACKED_CLASSES

    return tuple(PACKED_CLASSES.items())


def uninstall(model: nn.Module) -> None:
    """Give the model's module, and mlx-lm's generate module, back mlx-lm's own functions, and the
    model's norms, RoPEs and packed projections their MLX classes (benchmarks compare the two in one
    run)."""
    for module in (sys.modules[type(model).__module__], generate_module()):
        for name, function in getattr(module, ORIGINALS, {}).items():
            setattr(module, name, function)
        if hasattr(module, ORIGINALS):
            delattr(module, ORIGINALS)
    for _, layer in model.named_modules():
        for base, sub in ((nn.RMSNorm, KernelRMSNorm), (nn.RoPE, KernelRoPE), *packed_pairs()):
            if isinstance(layer, sub):
                layer.__class__ = base
                layer.__dict__.pop("_pack", None)
