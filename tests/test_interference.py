"""Interference analysis: constructed adapters with known answers, the low-rank algebra against formed
ΔW, base-weight norms (float and quantized), the CLI's four files and its one-line refusals."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from random_adapters import ALL, make_adapter
from safetensors.numpy import load_file

from mlx_med.adapters.format import Adapter, AdapterMeta, factor_keys, lora_scale, read_adapter, write_adapter
from mlx_med.adapters.interference import (
    analyse_pair,
    low_rank_inner,
    module_position,
    sign_conflict,
    subspace_overlap,
    update_subspaces,
)
from mlx_med.adapters.interference_summary import inspect_pair, layer_bands, suggest_schedule
from mlx_med.adapters.merge import to_numpy
from mlx_med.cli import cli

IN, OUT, LAYERS = 16, 12, 4
TYPES = ("self_attn.q_proj", "mlp.down_proj")


def module(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{kind}"


def write_factors(path, factors: dict[str, tuple[np.ndarray, np.ndarray]], lora_alpha: float = 8.0,
                  base: str = "fp-base", phase: str = "pt"):
    """An adapter dir from explicit ``{module: (a (in × r), b (r × out))}``, via the format module's writer."""
    rank = next(iter(factors.values()))[0].shape[1]
    weights = {}
    for name, (a, b) in factors.items():
        key_a, key_b = factor_keys(name)
        weights[key_a], weights[key_b] = mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32)
    meta = AdapterMeta(phase=phase, base_model="base", base_fingerprint=base, lora_alpha=lora_alpha)
    adapter = Adapter(rank=rank, scale=lora_scale(lora_alpha, rank), num_layers=LAYERS,
                      keys=sorted({n.split(".", 3)[3] for n in factors}), weights=weights, meta=meta)
    write_adapter(adapter, path)
    return path


def random_factors(seed: int, rank: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {module(i, t): (rng.standard_normal((IN, rank)), rng.standard_normal((rank, OUT)))
            for i in range(LAYERS) for t in TYPES}


def by_module(result):
    return {row.module: row for row in result.modules}


def test_identical_adapters_agree_fully(tmp_path):
    factors = random_factors(0)
    result = analyse_pair(write_factors(tmp_path / "sft", factors, phase="sft"), write_factors(tmp_path / "pt", factors))
    assert len(result.modules) == LAYERS * len(TYPES) and not result.stacked
    for row in result.modules:
        assert row.cosine == pytest.approx(1.0, abs=1e-9)
        assert row.overlap_out == pytest.approx(1.0, abs=1e-9) and row.overlap_in == pytest.approx(1.0, abs=1e-9)
        assert row.sign_conflict == 0.0
        assert row.cancelled == pytest.approx(-1.0, abs=1e-9)  # equal parallel parts reinforce
        assert row.merged_norm == pytest.approx(row.norm_sft, rel=1e-9)  # 0.5·ΔW + 0.5·ΔW = ΔW


def test_negated_b_cancels_at_even_mix(tmp_path):
    factors = random_factors(1)
    negated = {name: (a, -b) for name, (a, b) in factors.items()}
    result = analyse_pair(write_factors(tmp_path / "sft", negated, phase="sft"), write_factors(tmp_path / "pt", factors),
                          alpha=0.5)
    for row in result.modules:
        assert row.cosine == pytest.approx(-1.0, abs=1e-9)
        assert row.overlap_out == pytest.approx(1.0, abs=1e-9)  # same subspaces, opposite direction
        assert row.sign_conflict == 1.0
        assert row.merged_norm == pytest.approx(0.0, abs=1e-6 * row.norm_pt)
        assert row.cancelled == pytest.approx(1.0, abs=1e-6) and row.merged_over_sft == pytest.approx(0.0, abs=1e-6)
    uneven = analyse_pair(tmp_path / "sft", tmp_path / "pt", alpha=0.25)
    for row in uneven.modules:  # 0.25·(−ΔW) + 0.75·ΔW = 0.5·ΔW: energy 0.25 of the parts' 0.0625 + 0.5625
        assert row.merged_over_pt == pytest.approx(0.5, rel=1e-9) and row.cancelled == pytest.approx(0.6, rel=1e-9)


def test_orthogonal_subspaces_do_not_overlap(tmp_path):
    rng = np.random.default_rng(2)
    first, second = {}, {}
    for layer in range(LAYERS):
        for kind in TYPES:
            a1, a2 = np.zeros((IN, 2)), np.zeros((IN, 2))
            b1, b2 = np.zeros((2, OUT)), np.zeros((2, OUT))
            a1[: IN // 2], a2[IN // 2:] = rng.standard_normal((IN // 2, 2)), rng.standard_normal((IN // 2, 2))
            b1[:, : OUT // 2], b2[:, OUT // 2:] = rng.standard_normal((2, OUT // 2)), rng.standard_normal((2, OUT // 2))
            first[module(layer, kind)], second[module(layer, kind)] = (a1, b1), (a2, b2)
    result = analyse_pair(write_factors(tmp_path / "sft", first, phase="sft"), write_factors(tmp_path / "pt", second))
    for row in result.modules:
        assert row.overlap_out == pytest.approx(0.0, abs=1e-12) and row.overlap_in == pytest.approx(0.0, abs=1e-12)
        assert row.cosine == pytest.approx(0.0, abs=1e-12) and row.cancelled == pytest.approx(0.0, abs=1e-12)
        assert math.isnan(row.sign_conflict) and row.both_large == 0.0  # large entries never coincide


def test_low_rank_inner_product_equals_formed_delta(tmp_path, tiny_llama):
    sft = read_adapter(make_adapter(tiny_llama, tmp_path / "sft", rank=3, lora_alpha=6, keys=ALL, seed=3).path)
    pt = read_adapter(make_adapter(tiny_llama, tmp_path / "pt", rank=5, lora_alpha=2.5, keys=ALL, seed=4).path)
    result = analyse_pair(tmp_path / "sft", tmp_path / "pt", alpha=0.3)
    assert result.modules
    for row in result.modules:
        d1, d2 = to_numpy(sft.delta(row.module)).astype(np.float64), to_numpy(pt.delta(row.module)).astype(np.float64)
        assert row.norm_sft == pytest.approx(np.linalg.norm(d1), rel=1e-5)
        assert row.norm_pt == pytest.approx(np.linalg.norm(d2), rel=1e-5)
        assert row.cosine == pytest.approx(np.sum(d1 * d2) / np.linalg.norm(d1) / np.linalg.norm(d2), abs=1e-5)
        assert row.merged_norm == pytest.approx(np.linalg.norm(0.3 * d1 + 0.7 * d2), rel=1e-5)
        a1, b1 = (np.array(x, dtype=np.float64) for x in sft.raw_factors(row.module))
        a2, b2 = (np.array(x, dtype=np.float64) for x in pt.raw_factors(row.module))
        assert low_rank_inner(a1, b1, sft.scale, a2, b2, pt.scale) == pytest.approx(np.sum(d1 * d2), rel=1e-5)


def test_principal_angles_against_scipy_free_reference():
    rng = np.random.default_rng(5)
    a1, b1 = rng.standard_normal((20, 3)), rng.standard_normal((3, 9))
    a2, b2 = rng.standard_normal((20, 4)), rng.standard_normal((4, 9))
    out1, in1 = update_subspaces(a1, b1)
    out2, _ = update_subspaces(a2, b2)
    assert out1.shape == (9, 3) and in1.shape == (20, 3)
    # reference: orthonormal bases of the formed ΔW's column spaces by full SVD
    u1 = np.linalg.svd((a1 @ b1).T)[0][:, :3]
    u2 = np.linalg.svd((a2 @ b2).T)[0][:, :4]
    expected = np.mean(np.linalg.svd(u1.T @ u2, compute_uv=False) ** 2)
    assert subspace_overlap(out1, out2) == pytest.approx(expected, abs=1e-10)
    # a rank-deficient factor spans only ΔW's true rank
    a_dup = np.concatenate([a1[:, :1], a1[:, :1]], axis=1)
    assert update_subspaces(a_dup, b1[:2])[0].shape[1] == 1
    # zero update: no subspace, overlap undefined
    assert math.isnan(subspace_overlap(update_subspaces(a1, np.zeros_like(b1))[0], out2))


def test_sign_conflict_definition():
    d1 = np.array([[10.0, -9.0, 0.1, 0.2, 0.3]])
    d2 = np.array([[-8.0, -7.0, 0.3, 0.2, 0.1]])
    conflict, both = sign_conflict(d1, d2, top_fraction=0.4)  # large in both: entries 0 and 1
    assert conflict == 0.5 and both == pytest.approx(2 / 5)


def test_stacked_sft_is_compared_by_its_own_delta(tmp_path, tiny_llama):
    pt = make_adapter(tiny_llama, tmp_path / "pt", rank=4, keys=ALL, seed=6)
    own = make_adapter(tiny_llama, tmp_path / "sft", rank=2, keys=ALL, seed=7, phase="sft", stacked_on=tmp_path / "pt")
    result = analyse_pair(tmp_path / "sft", tmp_path / "pt", alpha=0.4)
    assert result.stacked and result.coefficients == {"sft": 0.4, "pt": 1.0}
    row = result.modules[0]
    d_own, d_pt = to_numpy(own.delta(row.module)), to_numpy(pt.delta(row.module))
    assert row.norm_sft == pytest.approx(np.linalg.norm(d_own), rel=1e-5)
    assert row.merged_norm == pytest.approx(np.linalg.norm(0.4 * d_own + d_pt), rel=1e-5)  # the merge's ΔW
    summary = inspect_pair(tmp_path / "sft", tmp_path / "pt", tmp_path / "out", alpha=0.4).read_text()
    assert "stacked on the PT run" in summary and "**own** ΔW_sft" in summary


def test_base_norms_float_and_quantized(tmp_path, tiny_llama):
    make_adapter(tiny_llama, tmp_path / "sft", keys=ALL, seed=8, phase="sft")
    make_adapter(tiny_llama, tmp_path / "pt", keys=ALL, seed=9)
    weights = load_file(str(tiny_llama / "model.safetensors"))
    result = analyse_pair(tmp_path / "sft", tmp_path / "pt", model=tiny_llama)
    for row in result.modules:
        expected = np.linalg.norm(weights[f"{row.module}.weight"].astype(np.float64))
        assert row.norm_base == pytest.approx(expected, rel=1e-5)
        assert row.rel_sft == pytest.approx(row.norm_sft / expected, rel=1e-5)
    assert result.notes == []  # the adapters were made on this very folder

    import mlx_lm

    quantized = tmp_path / "q4"
    assert CliRunner().invoke(cli, ["convert", "--hf-path", str(tiny_llama), "-o", str(quantized), "--q-bits", "4",
                                    "--q-group-size", "32", "--quiet"]).exit_code == 0
    model, _ = mlx_lm.load(str(quantized))
    layers = dict(model.named_modules())
    q_result = analyse_pair(tmp_path / "sft", tmp_path / "pt", model=quantized)
    assert q_result.notes and "fingerprint" in q_result.notes[0]  # trained on the float folder
    for row in q_result.modules:
        layer = layers[row.module]
        dense = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        assert row.norm_base == pytest.approx(float(mx.linalg.norm(dense.astype(mx.float32))), rel=1e-5)


def test_schedule_lowers_alpha_where_cosine_is_negative(tmp_path):
    factors = random_factors(10)
    # layers 2-3: SFT's down_proj is PT's negated (cosine −1); everything else identical (cosine +1)
    sft = {name: ((a, -b) if module_position(name)[0] >= 2 and name.endswith("down_proj") else (a, b))
           for name, (a, b) in factors.items()}
    result = analyse_pair(write_factors(tmp_path / "sft", sft, phase="sft"), write_factors(tmp_path / "pt", factors))
    assert layer_bands([0, 1, 2, 3]) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert suggest_schedule(result) == [{"layers": "2-3", "modules": ["down_proj"], "alpha": 0.0}]


def test_cli_writes_four_files_and_prints_summary(tmp_path, tiny_llama):
    make_adapter(tiny_llama, tmp_path / "sft", rank=2, keys=ALL, seed=11, phase="sft")
    make_adapter(tiny_llama, tmp_path / "pt", rank=4, keys=ALL, seed=12)
    out = tmp_path / "inspect"
    result = CliRunner().invoke(cli, ["inspect", "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["interference.csv", "interference.png", "suggested_schedule.yaml",
                                                     "summary.md"]
    summary = (out / "summary.md").read_text()
    assert summary in result.output and "Most conflict by layer" in summary and "heuristic" in summary
    assert (out / "interference.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "interference.csv").read_text().splitlines()
    assert len(lines) == 1 + len(read_adapter(tmp_path / "sft").modules())
    schedule = yaml.safe_load((out / "suggested_schedule.yaml").read_text())
    assert schedule["default"] == 0.5 and isinstance(schedule["rules"], list)
    for rule in schedule["rules"]:
        assert set(rule) <= {"layers", "modules", "alpha"} and 0 <= rule["alpha"] < 0.5
    again = CliRunner().invoke(cli, ["inspect", "--sft", str(tmp_path / "sft"), "--pt", str(tmp_path / "pt"),
                                     "-o", str(out), "--alpha", "0.7", "--model", str(tiny_llama), "--force"])
    assert again.exit_code == 0, again.output
    assert "rel_sft" in (out / "interference.csv").read_text() and "‖ΔW‖/‖W‖" in again.output
    assert yaml.safe_load((out / "suggested_schedule.yaml").read_text())["default"] == 0.7


@pytest.mark.parametrize("case", ["missing", "bases", "disjoint", "exists"])
def test_cli_refusals_are_one_line(tmp_path, case):
    factors = random_factors(13)
    pt = write_factors(tmp_path / "pt", factors)
    if case == "missing":
        sft, expect = tmp_path / "nope", "adapter directory not found"
    elif case == "bases":
        sft, expect = write_factors(tmp_path / "sft", factors, base="other-base", phase="sft"), "different base models"
    elif case == "disjoint":
        moved = {name.replace("layers.", "layers.1"): f for name, f in factors.items()}
        sft, expect = write_factors(tmp_path / "sft", moved, phase="sft"), "no module in common"
    else:
        sft, expect = write_factors(tmp_path / "sft", factors, phase="sft"), "already exists"
        (tmp_path / "out").mkdir()
    result = CliRunner().invoke(cli, ["inspect", "--sft", str(sft), "--pt", str(pt), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and expect in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert case == "exists" or not (tmp_path / "out").exists()


def test_report_includes_an_inspect_folder(tmp_path, tiny_llama):
    from mlx_med.evaluation.report import build_report

    make_adapter(tiny_llama, tmp_path / "sft", keys=ALL, seed=14, phase="sft")
    make_adapter(tiny_llama, tmp_path / "pt", keys=ALL, seed=15)
    inspect_pair(tmp_path / "sft", tmp_path / "pt", tmp_path / "study" / "inspect", alpha=0.5)
    report = build_report([tmp_path / "study"], tmp_path / "report.md")
    assert "## Where the adapters interfere: study/inspect" in report
    assert "](study/inspect/interference.png)" in report  # relative to the report, not to summary.md
    assert "### Suggested α schedule (heuristic)" in report and "# Where the adapters interfere: sft" not in report
    assert "[suggested_schedule.yaml](study/inspect/suggested_schedule.yaml)" in report


def test_sampled_sign_conflict_matches_exact():
    from mlx_med.adapters.interference import update_entries

    rng = np.random.default_rng(16)
    a1, b1 = rng.standard_normal((300, 4)), rng.standard_normal((4, 400))
    a2, b2 = a1 + 0.8 * rng.standard_normal((300, 4)), -b1 + 0.8 * rng.standard_normal((4, 400))  # mostly opposed
    full = update_entries(a1, b1, a2, b2, "m", limit=300 * 400)
    np.testing.assert_allclose(full[0], a1 @ b1, rtol=1e-4, atol=1e-5)  # fp32
    exact = sign_conflict(*full)
    sampled = update_entries(a1, b1, a2, b2, "m", limit=40_000)
    assert 36_000 <= sampled[0].size <= 40_000 and sampled[0].shape == sampled[1].shape  # a 173 × 231 grid
    np.testing.assert_array_equal(sampled[0], update_entries(a1, b1, a2, b2, "m", limit=40_000)[0])  # seeded
    estimate = sign_conflict(*sampled)
    assert exact[0] > 0.6 and estimate[0] == pytest.approx(exact[0], abs=0.02)
    assert estimate[1] == pytest.approx(exact[1], abs=0.01)
