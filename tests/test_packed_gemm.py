"""Projections over weights packed once (``mlx_med/kernels/packed_gemm.cpp``, ``packed.py``): OpenBLAS's
own kernel must give MLX's matmul bit for bit, in the kernel alone, in a model's forward pass and in
batched greedy generation, and a layer whose weight is replaced must not use its stale copy."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny_models import build_model

from mlx_med.kernels import cpu_kernels, pack_projections
from mlx_med.kernels.install import uninstall
from mlx_med.kernels.packed import (
    MAX_ROWS,
    SMALL_WORK,
    BlasCut,
    PackedEmbedding,
    PackedLinear,
    calibrate,
    small_rows,
)

# OpenBLAS's cores whose builds carry the AVX-512 small-matrix kernels (their KERNEL files include SKYLAKEX's)
SMALL_KERNEL_CORES = {"SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS"}

# (N, K): the demo model's four projection shapes, an N that is no multiple of OpenBLAS's 16-row groups,
# and an inner size whose last two blocks the one-thread and threaded drivers cut differently
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (200, 576), (320, 1000)]


@pytest.fixture(scope="module")
def kernels():
    found, reason = cpu_kernels()
    assert found is not None, reason
    usable, core = found.module.openblas_core()
    if not usable:
        pytest.skip(f"OpenBLAS's per-core kernels are not callable here: {core}")
    return found


@pytest.fixture(scope="module")
def cut(kernels) -> BlasCut:
    found, matched = calibrate(kernels, [mx.random.normal(shape, key=mx.random.key(sum(shape))) for shape in SHAPES])
    assert found is not None and set(matched) == set(SHAPES), f"{found} matched only {matched}"
    return found


@pytest.fixture(scope="module")
def small(kernels, cut) -> dict[tuple[int, int], list[int]]:
    return {shape: small_rows(kernels, cut, mx.random.normal(shape, key=mx.random.key(sum(shape)))) for shape in SHAPES}


def test_packed_matmul_is_mlx_s_matmul_bit_for_bit(kernels, cut, small):
    for n, k in SHAPES:
        weight = mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.05
        packed = kernels.module.pack_weight(weight, *cut)
        for rows in (1, 2, 3, 7, 8, 17, 33, 64, 100, 255, MAX_ROWS):
            if rows * n * k <= SMALL_WORK and rows not in small[(n, k)]:
                continue
            x = mx.random.normal((rows, k), key=mx.random.key(rows))
            out = kernels.module.packed_matmul(x, packed, n, *cut)
            assert mx.array_equal(out, x @ weight.T).item(), f"({rows}, {k}) @ ({n}, {k})^T"
        # batch dimensions and a non-contiguous input (a transposed view) too
        x = mx.random.normal((k, 2, 40), key=mx.random.key(7)).transpose(1, 2, 0)
        assert mx.array_equal(kernels.module.packed_matmul(x, packed, n, *cut), x @ weight.T).item()


def test_row_counts_under_the_small_matrix_size_that_the_driver_takes(kernels, cut, small, wide_llama):
    """Under 100^3 a product takes the packed path only at the row counts found to give MLX's bits there (its
    level-3 driver's, not a small-matrix kernel's). On OpenBLAS's AVX-512 cores those are exactly what the
    small kernel's TN rule leaves to the driver (M·N over 1200 or K under 32): one row of a 1536-row weight,
    seven to nine of a 192-row one. The check can fail: blocks cut elsewhere find no row count."""
    for (n, k), rows in small.items():
        assert all(0 < r * n * k <= SMALL_WORK for r in rows)
    if kernels.module.openblas_core()[1] in SMALL_KERNEL_CORES:
        for (n, k), rows in small.items():
            assert rows == [r for r in range(1, MAX_ROWS + 1) if r * n * k <= SMALL_WORK and (r * n > 1200 or k < 32)]
        assert small[(1536, 576)] == [1] and small[(192, 576)] == [7, 8, 9] and small[(576, 576)] == [3]
    weight = mx.random.normal((192, 576), key=mx.random.key(9))
    assert small_rows(kernels, cut._replace(q=256 if cut.q != 256 else 320), weight) == []

    from mlx_med.models import load_model

    model = load_model(wide_llama).model
    pack_projections(model)
    k_proj = model.model.layers[0].self_attn.k_proj  # 128 x 256: up to 30 rows under 100^3
    rows = k_proj.__dict__["_pack"].small_rows
    assert rows and max(rows) <= 30
    x = mx.random.normal((max(rows), 256), key=mx.random.key(1))
    assert k_proj.__dict__["_pack"].matmul(x) is not None and mx.array_equal(k_proj(x), x @ k_proj.weight.T).item()


def test_a_wrong_cut_gives_other_bits(kernels, cut):
    """The check can fail: cutting the inner sums elsewhere than OpenBLAS does changes the outputs."""
    n, k = 576, 1536
    weight = mx.random.normal((n, k), key=mx.random.key(1))
    x = mx.random.normal((64, k), key=mx.random.key(2))
    wrong = cut._replace(q=256 if cut.q != 256 else 320)  # the same tiling, blocks cut elsewhere
    packed = kernels.module.pack_weight(weight, *wrong)
    assert not mx.array_equal(kernels.module.packed_matmul(x, packed, n, *wrong), x @ weight.T).item()


def test_bad_arguments_are_refused(kernels, cut):
    weight = mx.random.normal((192, 576))
    packed = kernels.module.pack_weight(weight, *cut)
    with pytest.raises(ValueError, match="packed_matmul"):
        kernels.module.packed_matmul(mx.random.normal((64, 577)), packed, 192, *cut)  # another K
    with pytest.raises(ValueError, match="packed_matmul"):
        kernels.module.packed_matmul(mx.random.normal((64, 576)), packed, 200, *cut)  # another N
    with pytest.raises(ValueError, match="packed_matmul"):
        kernels.module.pack_weight(weight.astype(mx.float16), *cut)


def test_calls_from_two_threads_at_once_are_right(kernels, cut):
    """The worker pool runs one call at a time; a second caller does its parts itself."""
    weight = mx.random.normal((1536, 576), key=mx.random.key(3))
    packed = kernels.module.pack_weight(weight, *cut)
    wrong = []

    def work(seed):
        with mx.stream(mx.new_stream(mx.cpu)):
            for i in range(30):
                x = mx.random.normal((48, 576), key=mx.random.key(seed * 100 + i))
                if not mx.array_equal(kernels.module.packed_matmul(x, packed, 1536, *cut), x @ weight.T).item():
                    wrong.append((seed, i))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny llama wide enough for its projections to take the packed path at decode sizes (tied head)."""
    return build_model(tmp_path_factory.mktemp("wide-llama"), "llama", tiny_tokenizer_dir, seed=5,
                       overrides={"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True})


def test_a_packed_model_gives_mlx_s_logits_and_a_replaced_weight_is_not_stale(kernels, cut, wide_llama):
    from mlx_med.models import load_model

    model = load_model(wide_llama).model
    tokens = mx.array([[5, 9, 13, 2, 7, 11, 3, 8]] * 8)  # 64 rows through every projection
    before = model(tokens)
    mx.eval(before)
    note = pack_projections(model)
    assert "packed for OpenBLAS" in note, note
    linear = model.model.layers[0].mlp.gate_proj
    assert isinstance(linear, PackedLinear) and isinstance(model.model.embed_tokens, PackedEmbedding)
    assert mx.array_equal(model(tokens), before).item()
    assert pack_projections(model) == "projections: packed already"

    # a gradient through a packed layer (an input's, as LoRA training takes it) is MLX's own
    x = mx.random.normal((64, linear.weight.shape[1]))
    weight = linear.weight
    grad = mx.grad(lambda x: (linear(x) ** 2).sum())(x)
    assert linear.__dict__["_pack"] is not None  # the packed path ran
    assert mx.array_equal(grad, mx.grad(lambda x: ((x @ weight.T) ** 2).sum())(x)).item()
    # (training that updates the weight puts new arrays in the layer: MLX's matmul, below)

    linear.weight = linear.weight * 2  # a new array: the packed copy is stale from here on
    assert mx.array_equal(linear(x), x @ linear.weight.T).item()
    assert linear.__dict__["_pack"] is None
    assert "1 of 1 weights packed" in pack_projections(model)  # packs only the replaced one
    assert mx.array_equal(linear(x), x @ linear.weight.T).item()

    uninstall(model)
    assert type(linear) is nn.Linear and "_pack" not in linear.__dict__


def test_batched_greedy_generation_is_the_same_packed_or_not(kernels, cut, wide_llama, monkeypatch):
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.generate import GenerationProfile, generate_batch
    from mlx_med.models import load_model

    conversations = [[{"role": "user", "content": text}] for text in
                     ("fever and cough", "高血压患者应低盐饮食", "Is aspirin indicated after a stroke? " * 3)] * 6

    def run(model):
        profile = GenerationProfile()
        results = generate_batch(model, loaded.tokenizer, conversations, DecodingConfig(max_new_tokens=16),
                                 batch_size=18, progress=False, profile=profile)
        return [(r.text, r.generation_tokens) for r in results], profile.projections

    loaded = load_model(wide_llama)
    packed_tokens, note = run(loaded.model)
    assert "packed for OpenBLAS" in note and isinstance(loaded.model.model.layers[1].self_attn.o_proj, PackedLinear)
    plain = load_model(wide_llama).model
    monkeypatch.setenv("MLX_MED_PACKED_WEIGHTS", "off")
    plain_tokens, note = run(plain)
    assert note == "projections: MLX's matmul (MLX_MED_PACKED_WEIGHTS=off)"
    assert type(plain.model.layers[1].self_attn.o_proj) is nn.Linear
    assert packed_tokens == plain_tokens


def test_weights_too_small_to_leave_the_small_matrix_range_are_not_packed(kernels, cut, tiny_llama):
    from mlx_med.models import load_model

    model = load_model(tiny_llama).model
    pack_projections(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    packed = {id(m) for m in layers if isinstance(m, (PackedLinear, PackedEmbedding))}
    assert packed and len(packed) < len(layers)  # its head is large enough, its projections are not
    assert all((m.weight.size * MAX_ROWS > SMALL_WORK) == (id(m) in packed) for m in layers)


def test_a_calibration_is_recorded_and_read_back_after_a_spot_check(kernels, cut, tmp_path, monkeypatch):
    import json

    import mlx_med.kernels.packed as packed

    weights = [mx.random.normal(shape, key=mx.random.key(sum(shape))) for shape in SHAPES[:3]]
    monkeypatch.setattr(kernels, "module_file", tmp_path / "module.so")
    found, matched, small, recorded = packed.recorded_calibration(kernels, weights)
    record = tmp_path / packed.RECORD
    assert found is not None and set(matched) == set(SHAPES[:3]) and not recorded and record.is_file()
    assert set(small) == set(matched) and any(small.values())

    tries = []
    monkeypatch.setattr(packed, "calibrate", lambda kernels, weights: tries.append(len(weights)) or (None, []))
    assert packed.recorded_calibration(kernels, weights) == (found, matched, small, True) and not tries
    # other shapes are another entry
    assert packed.recorded_calibration(kernels, weights[:2]) == (None, [], {}, False) and tries == [2]

    # a recorded cut that no longer gives MLX's bits (here: blocks cut elsewhere) is calibrated again
    records = json.loads(record.read_text())
    key = next(k for k, v in records.items() if v["cut"])
    records[key]["cut"] = list(found._replace(q=256 if found.q != 256 else 320))
    record.write_text(json.dumps(records))
    assert packed.recorded_calibration(kernels, weights) == (None, [], {}, False) and tries == [2, 3]
    record.write_text("{not json")  # unreadable: calibrated again, and the record rewritten
    assert packed.recorded_calibration(kernels, weights) == (None, [], {}, False) and tries == [2, 3, 3]
    assert json.loads(record.read_text())
    # an entry from before the row counts under 100^3 were checked (no "small_rows") is calibrated again
    records = json.loads(record.read_text())
    records[key] = {"cut": list(found), "matched": [list(s) for s in matched]}
    record.write_text(json.dumps(records))
    assert packed.recorded_calibration(kernels, weights) == (None, [], {}, False) and tries == [2, 3, 3, 3]


def test_shapes_that_match_no_cut_are_not_tried_again(kernels, wide_llama, monkeypatch):
    import mlx_med.kernels.packed as packed
    from mlx_med.models import load_model

    tries = []
    monkeypatch.setattr(packed, "recorded_calibration", lambda k, weights: tries.append(len(weights)) or (None, [], {}, False))
    for name in ("packed_checked", "packed_shapes"):
        monkeypatch.setattr(kernels, name, set())
    monkeypatch.setattr(kernels, "packed_cut", None)
    model = load_model(wide_llama).model
    for _ in range(2):
        assert "MLX's matmul (no cut" in packed.pack_for_generation(model, kernels)
    assert len(tries) == 1 and not any(isinstance(m, (PackedLinear, PackedEmbedding)) for m in model.modules())


def test_live_adapters_factors_packed_give_mlx_s_logits(kernels, cut, wide_llama, tmp_path, monkeypatch):
    """A mixed-α batch's thin LoRA products over 100^3 (96 rows here: the 768-wide down_proj's x @ A and the
    B products of the 768-wide gate and up) run packed, on the worker pool rather than OpenBLAS's threaded
    driver, with MLX's logits bit for bit; a factor whose check fails is not packed."""
    from random_adapters import ALL, make_adapter

    from mlx_med.adapters.live import load_with_adapters
    from mlx_med.kernels.packed_factors import pack_factor

    make_adapter(wide_llama, tmp_path / "sft", rank=8, keys=ALL, seed=1, phase="sft")
    make_adapter(wide_llama, tmp_path / "pt", rank=8, keys=ALL, seed=2)
    loaded, live = load_with_adapters(wide_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", alpha=0.5)
    model = loaded.model
    tokens = mx.array([[(7 * i) % 500 + 3] for i in range(96)])  # one decode step's 96 rows, no cache
    live.set_row_weights([{"sft": a, "pt": 1 - a} for a in (0.0, 0.25, 0.5, 0.75, 1.0, 0.5) * 16])
    before = model(tokens)
    mx.eval(before)
    note = pack_projections(model)
    assert "live adapters' factors packed in" in note, note
    down = model.model.layers[0].mlp.down_proj
    assert down._packed[0] is not None and down._packed[0].matmul(mx.zeros((96, 768))) is not None
    assert model.model.layers[0].mlp.up_proj._packed[1].matmul(mx.zeros((96, 16))) is not None
    assert mx.array_equal(model(tokens), before).item()
    live.clear_row_weights()

    monkeypatch.setattr(kernels, "packed_factors", {})
    monkeypatch.setattr(kernels, "packed_cut", cut._replace(q=256 if cut.q != 256 else 320))
    assert pack_factor(kernels, down._stacked[0]) is None


def test_live_factors_packed_when_every_weight_starts_at_zero(kernels, wide_llama, tmp_path):
    """A server started with every adapter weight at 0 packs once, at start-up: the live factors must be
    packed then (not only once some weights have stacked them), and its later mixed batches run them
    packed with the bits of MLX's own products."""
    from random_adapters import ALL, make_adapter

    from mlx_med.adapters.live import load_with_adapters

    make_adapter(wide_llama, tmp_path / "sft", rank=8, keys=ALL, seed=1, phase="sft")
    make_adapter(wide_llama, tmp_path / "pt", rank=8, keys=ALL, seed=2)
    loaded, live = load_with_adapters(wide_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", w_sft=0.0, w_pt=0.0)
    note = pack_projections(loaded.model)
    assert "live adapters' factors packed in" in note, note
    assert loaded.model.model.layers[0].mlp.down_proj._packed[0] is not None

    tokens = mx.array([[(5 * i) % 500 + 3] for i in range(96)])
    live.set_row_weights([{"sft": a, "pt": 1 - a} for a in (0.0, 0.25, 0.5, 0.75, 1.0, 0.5) * 16])
    packed = loaded.model(tokens)
    mx.eval(packed)
    for layer in live.layers.values():  # MLX's own thin products, as before the packing
        object.__setattr__(layer, "_packed", (None, None))
    assert mx.array_equal(loaded.model(tokens), packed).item()
