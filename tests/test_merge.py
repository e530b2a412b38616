"""Merging in ΔW space: exact linear, SVD truncation, TIES/DARE against peft, stacking, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from random_adapters import ALL, ATTN, make_adapter

from mlx_med.adapters.format import read_adapter
from mlx_med.adapters.merge import dare_delta, merge_adapters, ties_delta, to_numpy
from mlx_med.adapters.mix import component_weights, load_pair, pair_weights
from mlx_med.cli import cli
from mlx_med.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("runs")
    make_adapter(tiny_llama, root / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt")
    make_adapter(tiny_llama, root / "sft", rank=2, lora_alpha=16, keys=ALL, seed=2, phase="sft")
    make_adapter(tiny_llama, root / "stacked", rank=2, lora_alpha=4, keys=ALL, seed=3, phase="sft",
                 stacked_on=root / "pt")
    return root


def exact(adapters, coefficients, module) -> np.ndarray:
    return sum(c * to_numpy(adapters[n].delta(module)) for n, c in coefficients.items())


def test_pair_weights():
    assert pair_weights(0.3) == pytest.approx({"sft": 0.3, "pt": 0.7})
    assert pair_weights(w_sft=1.0, w_pt=0.25) == {"sft": 1.0, "pt": 0.25}
    with pytest.raises(UserError, match="not both"):
        pair_weights(0.5, w_sft=1.0, w_pt=0.0)
    with pytest.raises(UserError, match="go together"):
        pair_weights(w_sft=1.0)
    with pytest.raises(UserError, match="missing --alpha"):
        pair_weights()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_linear_is_exact(runs, alpha):
    adapters = load_pair(runs / "sft", runs / "pt")
    result = merge_adapters(adapters, pair_weights(alpha), "linear")
    assert result.adapter.rank == 6 and result.adapter.scale == 1.0
    for module in adapters["sft"].modules():
        want = exact(adapters, {"sft": alpha, "pt": 1 - alpha}, module)
        np.testing.assert_allclose(to_numpy(result.adapter.delta(module)), want, atol=1e-6)


def test_stacked_semantics(runs):
    adapters = load_pair(runs / "stacked", runs / "pt")
    weights = pair_weights(0.25)
    assert component_weights(weights, {"sft": "pt"}) == pytest.approx({"sft": 0.25, "pt": 1.0})
    result = merge_adapters(adapters, weights, "linear")
    assert result.coefficients == pytest.approx({"sft": 0.25, "pt": 1.0})
    module = adapters["sft"].modules()[0]
    want = to_numpy(adapters["pt"].delta(module)) + 0.25 * to_numpy(adapters["sft"].delta(module))
    np.testing.assert_allclose(to_numpy(result.adapter.delta(module)), want, atol=1e-6)


def test_svd_error_decreases_and_is_exact_at_full_rank(runs):
    adapters = load_pair(runs / "sft", runs / "pt")
    weights = pair_weights(0.4)
    errors = []
    for rank in (1, 2, 4, 6):
        result = merge_adapters(adapters, weights, "svd", rank=rank)
        errors.append(result.summary()["mean_rel_error"])
        module = adapters["sft"].modules()[3]
        want = exact(adapters, weights, module)
        got = to_numpy(result.adapter.delta(module))
        measured = np.linalg.norm(got - want) / np.linalg.norm(want)
        report = next(m for m in result.modules if m.module == module)
        assert measured == pytest.approx(report.rel_error, abs=1e-5)  # the report tells the truth
        assert report.energy == pytest.approx(1 - report.rel_error**2, abs=1e-6)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1
    assert errors[-1] < 1e-6  # rank r_sft + r_pt holds ΔW exactly
    padded = merge_adapters(adapters, weights, "svd", rank=9)  # above the true rank: zero padding
    assert padded.adapter.rank == 9 and padded.summary()["max_rel_error"] < 1e-6


def test_ties_matches_peft_and_respects_alpha_endpoints():
    torch = pytest.importorskip("torch")
    from peft.utils.merge_utils import ties

    rng = np.random.default_rng(0)
    tasks = [rng.standard_normal((16, 24)), rng.standard_normal((16, 24))]
    ours = ties_delta(tasks, np.array([1.0, 1.0]), 0.4)
    theirs = ties([torch.tensor(t) for t in tasks], torch.tensor([1.0, 1.0], dtype=torch.float64), 0.4)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-12)
    only_first = ties_delta(tasks, np.array([1.0, 0.0]), 0.4)
    kept = np.abs(tasks[0]) >= np.sort(np.abs(tasks[0]).ravel())[-int(0.4 * tasks[0].size)]
    np.testing.assert_allclose(only_first, np.where(kept, tasks[0], 0.0))


def test_dare_definition():
    rng = np.random.default_rng(1)
    tasks = [rng.standard_normal((40, 50)), rng.standard_normal((40, 50))]
    weights = np.array([0.3, 0.7])
    seed = np.random.SeedSequence([7, 1])
    np.testing.assert_allclose(dare_delta(tasks, weights, 1.0, seed), 0.3 * tasks[0] + 0.7 * tasks[1])
    a = dare_delta([tasks[0]], np.array([1.0]), 0.25, np.random.SeedSequence([7, 1]))
    b = dare_delta([tasks[0]], np.array([1.0]), 0.25, np.random.SeedSequence([7, 1]))
    c = dare_delta([tasks[0]], np.array([1.0]), 0.25, np.random.SeedSequence([8, 1]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    kept = a != 0
    assert 0.15 < kept.mean() < 0.35  # about `density` of the entries survive
    np.testing.assert_allclose(a[kept], tasks[0][kept] / 0.25)  # rescaled by 1/density


def test_ties_and_dare_adapters(runs):
    adapters = load_pair(runs / "sft", runs / "pt")
    ties_result = merge_adapters(adapters, pair_weights(0.5), "ties", density=0.5)
    assert ties_result.adapter.rank == 6 and 0 < ties_result.summary()["max_rel_diff_linear"] < 2
    d1 = merge_adapters(adapters, pair_weights(0.5), "dare", density=0.5, seed=1, rank=32)
    d2 = merge_adapters(adapters, pair_weights(0.5), "dare", density=0.5, seed=1, rank=32)
    module = adapters["sft"].modules()[0]
    np.testing.assert_array_equal(to_numpy(d1.adapter.delta(module)), to_numpy(d2.adapter.delta(module)))
    full = merge_adapters(adapters, pair_weights(0.5), "dare", density=1.0, rank=6)
    np.testing.assert_allclose(to_numpy(full.adapter.delta(module)), exact(adapters, pair_weights(0.5), module),
                               atol=1e-6)
    with pytest.raises(UserError, match="--density is required"):
        merge_adapters(adapters, pair_weights(0.5), "ties")
    with pytest.raises(UserError, match="in \\(0, 1\\]"):
        merge_adapters(adapters, pair_weights(0.5), "dare", density=1.5)


def test_peft_cat_equals_linear(runs, tiny_llama):
    """peft's add_weighted_adapter(..., "cat") on the same two adapters gives our linear ΔW."""
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlx_med.adapters.peft_io import export_peft

    export_peft(runs / "sft", runs / "sft-peft", base_model=str(tiny_llama))
    export_peft(runs / "pt", runs / "pt-peft", base_model=str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(runs / "sft-peft"), adapter_name="sft")
    model.load_adapter(str(runs / "pt-peft"), adapter_name="pt")
    model.add_weighted_adapter(["sft", "pt"], [0.3, 0.7], "mix", combination_type="cat")
    ours = merge_adapters(load_pair(runs / "sft", runs / "pt"), pair_weights(0.3), "linear").adapter
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    theirs = layer.get_delta_weight("mix").detach().numpy()
    np.testing.assert_allclose(to_numpy(ours.delta("model.layers.1.mlp.down_proj")), theirs, atol=1e-5)


def test_refusals(runs, tmp_path, tiny_llama, tiny_qwen2):
    make_adapter(tiny_qwen2, tmp_path / "other-base", seed=5)
    with pytest.raises(UserError, match="different base models"):
        load_pair(runs / "sft", tmp_path / "other-base")
    make_adapter(tiny_llama, tmp_path / "attn-only", keys=ATTN, seed=6)
    with pytest.raises(UserError, match="target different modules.*only in sft: .*mlp"):
        merge_adapters(load_pair(runs / "sft", tmp_path / "attn-only"), pair_weights(0.5))
    make_adapter(tiny_llama, tmp_path / "pt2", keys=ALL, seed=7)
    with pytest.raises(UserError, match="trained on top of the adapter .*pt"):
        load_pair(runs / "stacked", tmp_path / "pt2")
    with pytest.raises(UserError, match="unknown merge method"):
        merge_adapters(load_pair(runs / "sft", runs / "pt"), pair_weights(0.5), "slerp")


def test_cli_merge(runs, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--sft", str(runs / "sft"), "--pt", str(runs / "pt"), "--alpha", "0.5",
            "--method", "svd", "--rank", "3", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "layer 1: energy min" in result.output and f"wrote {out}" in result.output
    merged = read_adapter(out)
    assert merged.rank == 3 and merged.meta.phase == "merged"
    assert merged.meta.extra["merge"]["weights"] == {"sft": 0.5, "pt": 0.5}
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["modules"]) == len(merged.modules()) and report["summary"]["min_energy"] < 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "already exists" in again.output
    config = tmp_path / "merge.yaml"
    config.write_text(f"sft: {runs / 'sft'}\npt: {runs / 'pt'}\nalpha: 0.2\n")
    ok = CliRunner().invoke(cli, ["merge", "-c", str(config), "-o", str(tmp_path / "m2"), "-q"])
    assert ok.exit_code == 0 and read_adapter(tmp_path / "m2").meta.extra["merge"]["weights"]["pt"] == 0.8


def test_stacked_lookup_and_changed_pt(tmp_path, tiny_llama):
    from mlx_med.adapters.format import write_adapter
    from mlx_med.adapters.mix import with_stacked_parent

    make_adapter(tiny_llama, tmp_path / "pt", seed=1)
    sft = make_adapter(tiny_llama, tmp_path / "sft", seed=2, phase="sft", stacked_on=tmp_path / "pt")
    # Recorded relative to another working directory: found beside the SFT run, fingerprint checked.
    sft.meta.stacked_on["path"] = "elsewhere/runs/pt"
    write_adapter(sft, tmp_path / "sft")
    found = with_stacked_parent(read_adapter(tmp_path / "sft"))
    assert found["stacked_on"].path == tmp_path / "pt"
    make_adapter(tiny_llama, tmp_path / "pt", seed=9)  # PT retrained after SFT was stacked on it
    with pytest.raises(UserError, match="have changed since"):
        with_stacked_parent(read_adapter(tmp_path / "sft"))
    with pytest.raises(UserError, match="have changed since"):
        load_pair(tmp_path / "sft", tmp_path / "pt")


def test_peft_folder_hint(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="a PEFT adapter; import it first: mlx-med import-adapter"):
        load_pair(tmp_path / "peft", tmp_path / "peft")
