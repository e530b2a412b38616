"""Live α: several adapters on one model with runtime weights equal the fused model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from random_adapters import ALL, make_adapter

from mlx_med.adapters import live as live_module
from mlx_med.adapters.format import read_adapter
from mlx_med.adapters.fuse import fuse_model
from mlx_med.adapters.live import MultiLoRALinear, attach_adapters, blas_adds_exactly, load_with_adapters
from mlx_med.errors import UserError
from mlx_med.kernels import cpu_kernels
from mlx_med.models import load_model

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 11]])


@pytest.fixture
def pair(tmp_path, tiny_model):
    pt = make_adapter(tiny_model, tmp_path / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt")
    sft = make_adapter(tiny_model, tmp_path / "sft", rank=2, lora_alpha=16, keys=ALL, seed=2, phase="sft")
    return tiny_model, tmp_path / "sft", tmp_path / "pt", sft, pt


def manual_fused_logits(model_dir, terms) -> np.ndarray:
    """Reference: W ← W + Σ c·ΔW written straight into the base weights."""
    loaded = load_model(model_dir)
    named = dict(loaded.model.named_modules())
    for coefficient, adapter in terms:
        for module in adapter.modules():
            layer = named[module]
            layer.weight = layer.weight + coefficient * adapter.delta(module)
    return np.array(loaded.model(TOKENS))


def test_live_alpha_equals_fused(pair, tmp_path):
    """One live model switched through α ∈ {0, 0.3, 1} gives the logits of the model fused at that α."""
    model_dir, sft_dir, pt_dir, sft, pt = pair
    loaded, live = load_with_adapters(model_dir, sft=sft_dir, pt=pt_dir, alpha=0.5)
    for alpha in (0.0, 0.3, 1.0):
        live.set_alpha(alpha)
        assert live.alpha == pytest.approx(alpha)
        got = np.array(loaded.model(TOKENS))
        fuse_model(model_dir, tmp_path / f"fused-{alpha}", sft=sft_dir, pt=pt_dir, alpha=alpha, dtype="float32")
        fused = np.array(load_model(tmp_path / f"fused-{alpha}").model(TOKENS))
        np.testing.assert_allclose(got, fused, atol=2e-4, rtol=1e-4)
        manual = manual_fused_logits(model_dir, [(alpha, sft), (1 - alpha, pt)])
        np.testing.assert_allclose(got, manual, atol=2e-4, rtol=1e-4)


def test_switching_back_and_detach_restore(pair):
    model_dir, sft_dir, pt_dir, *_ = pair
    base = np.array(load_model(model_dir).model(TOKENS))
    loaded, live = load_with_adapters(model_dir, sft=sft_dir, pt=pt_dir, alpha=0.0)
    at0 = np.array(loaded.model(TOKENS))
    live.set_alpha(1.0)
    at1 = np.array(loaded.model(TOKENS))
    assert np.abs(at1 - at0).max() > 1e-2  # the two adapters really differ
    live.set_alpha(0.0)
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), at0, atol=1e-5)
    live.set_weights(sft=0.0, pt=0.0)
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), base, atol=1e-5)
    assert live.alpha is None
    # The parameter tree holds only base weights, under <module>.linear.
    names = [k for k, _ in tree_flatten(loaded.model.parameters())]
    assert not any("lora" in k for k in names) and any(k.endswith("q_proj.linear.weight") for k in names)
    live.detach()
    assert not any(isinstance(m, MultiLoRALinear) for m in loaded.model.modules())
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), base, atol=1e-6)


def test_stacked_sft_means_pt_plus_own(tmp_path, tiny_llama):
    pt = make_adapter(tiny_llama, tmp_path / "pt", seed=3, phase="pt")
    own = make_adapter(tiny_llama, tmp_path / "sft", seed=4, phase="sft", stacked_on=tmp_path / "pt")
    loaded, live = load_with_adapters(tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", alpha=0.3)
    assert live.parents == {"sft": "pt"} and live.coefficients == pytest.approx({"sft": 0.3, "pt": 1.0})
    want = manual_fused_logits(tiny_llama, [(1.0, pt), (0.3, own)])
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)), want, atol=2e-4, rtol=1e-4)
    # A stacked run given alone brings its PT run along: the SFT model exactly.
    loaded1, live1 = load_with_adapters(tiny_llama, adapter=tmp_path / "sft")
    assert set(live1.adapters) == {"adapter", "stacked_on"}
    want1 = manual_fused_logits(tiny_llama, [(1.0, pt), (1.0, own)])
    np.testing.assert_allclose(np.array(loaded1.model(TOKENS)), want1, atol=2e-4, rtol=1e-4)


def test_stacked_on_other_pt_refused(tmp_path, tiny_llama):
    make_adapter(tiny_llama, tmp_path / "pt", seed=3)
    make_adapter(tiny_llama, tmp_path / "pt2", seed=5)
    make_adapter(tiny_llama, tmp_path / "sft", seed=4, phase="sft", stacked_on=tmp_path / "pt")
    with pytest.raises(UserError, match="trained on top of"):
        load_with_adapters(tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt2")


def test_quantized_base_layers(tmp_path, tiny_llama):
    """The live layer wraps QuantizedLinear too (GPU policy keeps them quantized)."""
    import mlx.nn as nn

    adapter = make_adapter(tiny_llama, tmp_path / "a", seed=6)
    loaded = load_model(tiny_llama)
    nn.quantize(loaded.model, group_size=32, bits=8)
    ref = load_model(tiny_llama)
    nn.quantize(ref.model, group_size=32, bits=8)
    live = attach_adapters(loaded.model, {"a": read_adapter(tmp_path / "a")}, {"a": 1.0})
    assert isinstance(live.layers["model.layers.0.self_attn.q_proj"].linear, nn.QuantizedLinear)
    x = mx.random.normal((3, 64))
    layer = dict(ref.model.named_modules())["model.layers.0.self_attn.q_proj"]
    want = layer(x) + x @ adapter.delta("model.layers.0.self_attn.q_proj").T
    got = live.layers["model.layers.0.self_attn.q_proj"](x)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)


def test_errors(pair, tmp_path, tiny_qwen2, tiny_llama):
    model_dir, sft_dir, pt_dir, *_ = pair
    _, live = load_with_adapters(model_dir, sft=sft_dir, pt=pt_dir)
    with pytest.raises(UserError, match="no adapter named"):
        live.set_weights(chat=1.0)
    with pytest.raises(UserError, match="not both"):
        load_with_adapters(model_dir, adapter=sft_dir, sft=sft_dir, pt=pt_dir)
    with pytest.raises(UserError, match="go together"):
        load_with_adapters(model_dir, sft=sft_dir)
    loaded, none = load_with_adapters(model_dir)
    assert none is None and loaded.model is not None
    # An adapter with other layer sizes is refused with the module named.
    other = make_adapter(tiny_llama, tmp_path / "other", seed=7)
    other.weights = {k: mx.concatenate([v, v], axis=0) if k.endswith("lora_a") else v for k, v in other.weights.items()}
    with pytest.raises(UserError, match=r"_proj is 128→\d+ in the adapter but 64→"):
        attach_adapters(load_model(tiny_qwen2).model, {"x": other}, {"x": 1.0})


def test_per_row_weights_equal_each_row_alone(pair):
    """A batch whose rows carry different α (one forward) = each row run alone at its α."""
    model_dir, sft_dir, pt_dir, *_ = pair
    loaded, live = load_with_adapters(model_dir, sft=sft_dir, pt=pt_dir, alpha=0.5)
    rows = mx.array([[5, 17, 42, 99, 3, 250, 7, 11], [8, 1, 300, 4, 4, 9, 60, 2],
                     [5, 17, 42, 99, 3, 250, 7, 11], [77, 6, 5, 40, 12, 13, 200, 1]])
    weights = [{"sft": 0.0, "pt": 1.0}, {"sft": 0.3, "pt": 0.7}, {"sft": 1.0, "pt": 0.0}, {"sft": 0.0, "pt": 0.0}]
    live.set_row_weights(weights)
    mixed = np.array(loaded.model(rows))
    alone = []
    for i, w in enumerate(weights):
        live.set_weights(**w)
        alone.append(np.array(loaded.model(rows[i: i + 1]))[0])
    np.testing.assert_allclose(mixed, np.stack(alone), atol=1e-5, rtol=1e-5)  # the BLAS may sum M=8 and M=32 apart
    # one formula for a row of a mixed batch and for the whole model at its weights: at the same batch
    # shape (the same BLAS kernels) a row's numbers are bit for bit those of the model-wide setting
    for i, w in enumerate(weights):
        live.set_weights(**w)
        np.testing.assert_array_equal(mixed[i], np.array(loaded.model(rows))[i])
    live.set_row_weights(weights)
    assert np.abs(mixed[0] - mixed[2]).max() > 1e-2  # same tokens, different α: really different rows
    # set_weights returns every row to the model-wide mix.
    live.set_row_weights(weights)
    live.set_weights(sft=0.3, pt=0.7)
    np.testing.assert_array_equal(np.array(loaded.model(rows))[1], mixed[1])
    with pytest.raises(UserError, match="no adapter named"):
        live.set_row_weights([{"lora": 1.0}])


def test_per_row_weights_with_stacked_sft(tmp_path, tiny_llama):
    make_adapter(tiny_llama, tmp_path / "pt", seed=3, phase="pt")
    make_adapter(tiny_llama, tmp_path / "sft", seed=4, phase="sft", stacked_on=tmp_path / "pt")
    loaded, live = load_with_adapters(tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", alpha=0.3)
    tokens = mx.concatenate([TOKENS, TOKENS])
    live.set_row_weights([{"sft": 0.3, "pt": 0.7}, {"sft": 0.9, "pt": 0.1}])
    mixed = np.array(loaded.model(tokens))
    for i, alpha in enumerate((0.3, 0.9)):
        live.set_alpha(alpha)
        np.testing.assert_allclose(mixed[i], np.array(loaded.model(TOKENS))[0], atol=1e-5, rtol=1e-5)


def mlx_runs_openblas() -> bool:
    """Whether MLX's GEMM is the OpenBLAS mlx-med preloaded (its symbols resolve in this process)."""
    found, _ = cpu_kernels()
    return found is not None and found.module.openblas_core()[0]


def test_lora_product_added_into_the_base_output_rounds_as_a_separate_add(pair, monkeypatch):
    """The BLAS's add of the LoRA product into base(x) (``mx.addmm``) keeps every bit of the separate add.

    Each live layer's output is compared with ``base(x) + ((x @ A) * C) @ B`` written out, over a batch
    of prefill-sized rows and a decode-sized one, per-row and model-wide weights alike. Under OpenBLAS
    (what mlx-med preloads) the layers must take the BLAS's add: a probe that stopped saying so would
    silently lose the speed.
    """
    model_dir, sft_dir, pt_dir, *_ = pair
    loaded, live = load_with_adapters(model_dir, sft=sft_dir, pt=pt_dir, alpha=0.5)
    layers = [m for _, m in loaded.model.named_modules() if isinstance(m, MultiLoRALinear)]
    openblas = mlx_runs_openblas()
    if openblas:
        assert blas_adds_exactly(layers[0].rank)
    assert not blas_adds_exactly(4096)  # an inner dimension past one block: added in parts, refused

    def check(rows: int, length: int) -> int:
        taken = 0
        for layer in layers:
            x = mx.random.normal((rows, length, layer._stacked[0].shape[0]), key=mx.random.key(rows * length))
            c, a, b, accumulate = layer._rows
            taken += accumulate
            expected = layer.linear(x) + ((x @ a) * c) @ b
            np.testing.assert_array_equal(np.array(layer(x)), np.array(expected))
        return taken

    for rows, length in ((3, 37), (5, 1)):
        live.set_row_weights([{"sft": i / rows, "pt": 1 - i / rows} for i in range(rows)])
        taken = check(rows, length)
        live.clear_row_weights()
        live.set_alpha(0.3)
        taken += check(rows, length)
        if openblas:
            assert taken == 2 * len(layers)
    # the demo model's widest projection, where OpenBLAS's AVX2 kernels round by a row's place in the call
    keys = mx.random.split(mx.random.key(7), 4)
    factors = {name: (mx.random.normal((576, 8), key=keys[2 * i]) * 0.05,
                      mx.random.normal((8, 1536), key=keys[2 * i + 1]) * 0.05, 2.0)
               for i, name in enumerate(("sft", "pt"))}
    wide = MultiLoRALinear(nn.Linear(576, 1536, bias=False), factors)
    wide.set_coefficients({"sft": mx.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.9, 0.3]), "pt": 0.5})
    layers.append(wide)
    # every layer whose inner dimension the probe passes takes the BLAS's add (all of them under OpenBLAS)
    passing = sum(blas_adds_exactly(layer.rank) for layer in layers)
    if openblas:
        assert passing == len(layers)
    assert check(8, 1) == passing
    monkeypatch.setattr(live_module, "blas_adds_exactly", lambda rank: False)
    live.set_alpha(0.7)
    wide.set_coefficients({"sft": 0.7, "pt": 0.3})
    assert check(2, 9) == 0  # the separate add, where the BLAS would round otherwise
