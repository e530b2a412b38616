"""Sweeps: grid/α parsing, the α rule, decoding and α sweeps on a tiny model with live adapters."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from random_adapters import ALL, make_adapter, write_pair

import mlx_med  # noqa: F401
from mlx_med.errors import ConfigError, UserError
from mlx_med.evaluation.alpha_sweep import (
    AlphaRule,
    AlphaSweepConfig,
    parse_alphas,
    pick_alpha,
    run_alpha_sweep,
)
from mlx_med.evaluation.sweep import (
    DecodingSweepConfig,
    normalise_grid,
    parse_grid,
    run_decoding_sweep,
)

ROWS = [
    {"messages": [{"role": "user", "content": "高血压患者应该注意什么？"},
                  {"role": "assistant", "content": "高血压患者应低盐饮食，规律服用降压药。"}]},
    {"prompt": "Is aspirin indicated after a stroke?", "response": "Yes, for ischemic stroke."},
    {"prompt": "糖尿病怎么治疗？", "output": "糖尿病患者需要定期监测血糖，控制饮食。"},
]


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    return path


def test_parse_grid_and_alphas():
    grid = normalise_grid(parse_grid(["temperature=0,0.7", "top-k=0,50"]))
    assert grid == {"temperature": [0.0, 0.7], "top_k": [0, 50]} and isinstance(grid["top_k"][1], int)
    with pytest.raises(ConfigError, match="unknown decoding setting"):
        normalise_grid(parse_grid(["temprature=0,1"]))
    with pytest.raises(ConfigError, match="NAME=V1"):
        parse_grid(["temperature"])
    assert parse_alphas("0,0.1,...,1") == pytest.approx([i / 10 for i in range(11)])
    assert parse_alphas("0,0.25,...,1") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0,0.3,...,1") == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])  # end point kept
    assert parse_alphas([1, 0.5, 0.5]) == [0.5, 1.0]
    for bad in ("0,1.5", "a,b", "0,...,1"):
        with pytest.raises(ConfigError):
            parse_alphas(bad)


def test_alpha_rule():
    rows = [
        {"alpha": 0.0, "rouge-l": 5.0, "ppl": 10.0, "safety": 90.0},
        {"alpha": 0.5, "rouge-l": 9.0, "ppl": 10.8, "safety": 88.0},
        {"alpha": 0.7, "rouge-l": 12.0, "ppl": 12.0, "safety": 86.0},
        {"alpha": 1.0, "rouge-l": 14.0, "ppl": 15.0, "safety": 85.0},
    ]
    alpha, reason = pick_alpha(rows, AlphaRule())
    assert alpha == 0.5 and "perplexity" in reason  # 0.7 and 1.0 are past 1.1 × 10
    assert pick_alpha(rows, AlphaRule(ppl_tolerance=0.25))[0] == 0.7
    assert pick_alpha(rows, AlphaRule(ppl_tolerance=1.0))[0] == 1.0
    # safety: α=0.5 falls more than 1 point below α=1's rate... no, it is above; make it drop
    unsafe = [dict(r) for r in rows]
    unsafe[1]["safety"] = 70.0
    assert pick_alpha(unsafe, AlphaRule())[0] == 0.0
    # nothing meets the perplexity limit together with safety: the safety limit is kept
    only_safe = [dict(r, safety=50.0) if r["alpha"] < 1 else r for r in rows]
    alpha, reason = pick_alpha(only_safe, AlphaRule())
    assert alpha == 1.0 and "dropped" in reason
    # a floor below 0 excludes nothing and says so instead of printing a negative pass rate
    low = [dict(r, safety=s) for r, s in zip(rows, (0.0, 1.5, 0.0, 3.0))]
    alpha, reason = pick_alpha(low, AlphaRule())
    assert alpha == 0.5 and "no safety limit" in reason and "≥ -" not in reason
    # ties go to the larger α; no ppl and no safety → plain best metric
    assert pick_alpha([{"alpha": 0.2, "rouge-l": 3.0}, {"alpha": 0.8, "rouge-l": 3.0}], AlphaRule())[0] == 0.8
    with pytest.raises(ConfigError):
        pick_alpha(rows, AlphaRule(metric="bleu-5"))


def test_decoding_sweep_files_and_greedy_dedup(tiny_llama, eval_file, tmp_path):
    out = tmp_path / "dec"
    cfg = DecodingSweepConfig(model=tiny_llama, data=eval_file, out=out, max_new_tokens=4, batch_size=3,
                              grid={"temperature": [0, 0.9], "top_p": [0.8, 1.0]})
    rows = run_decoding_sweep(cfg, quiet=True)
    assert len(rows) == 4
    assert [r["reused_from"] for r in rows if r["temperature"] == 0] == [None, "temperature=0_top_p=0.8"]
    for name in ("decoding_sweep.csv", "decoding_sweep.md", "decoding_sweep.png"):
        assert (out / name).stat().st_size > 0
    table = read_table(out / "decoding_sweep.csv")
    assert [r["temperature"] for r in table] == [0.0, 0.0, 0.9, 0.9]
    assert all(r["bleu-4"] is not None for r in table)
    sampled = json.loads((out / "settings" / "temperature=0.9_top_p=0.8" / "metrics.json").read_text())
    assert sampled["config"]["decoding"]["top_p"] == 0.8 and sampled["config"]["decoding"]["temperature"] == 0.9
    assert not (out / "settings" / "temperature=0_top_p=1").exists()  # greedy twin not regenerated
    # a second run reuses the finished settings (same numbers, no new generation)
    stamp = (out / "settings" / "temperature=0.9_top_p=0.8" / "metrics.json").stat().st_mtime_ns
    again = run_decoding_sweep(cfg, quiet=True)
    assert [r["bleu-4"] for r in again] == [r["bleu-4"] for r in rows]
    assert (out / "settings" / "temperature=0.9_top_p=0.8" / "metrics.json").stat().st_mtime_ns == stamp


def test_alpha_sweep_switches_live_and_picks(tiny_llama, eval_file, tmp_path):
    write_pair(tiny_llama, tmp_path)
    ppl = tmp_path / "pt_heldout.jsonl"
    ppl.write_text(json.dumps({"text": "Hypertension is treated with lifestyle changes."}) + "\n"
                   + json.dumps({"text": "糖尿病患者需要定期监测血糖。"}) + "\n", encoding="utf-8")
    probes = Path(__file__).resolve().parents[1] / "data" / "demo" / "safety_probes.jsonl"
    out = tmp_path / "alpha"
    cfg = AlphaSweepConfig(model=tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", data=eval_file, out=out,
                           alphas="0,0.5,1", ppl_data=ppl, ppl_block_size=8, max_new_tokens=4,
                           safety_probes=probes, limit=2)

    from mlx_med.evaluation.perplexity import perplexity_stats
    from mlx_med.evaluation.run_config import load_for_eval

    def perplexity(model, tokenizer, texts, block_size):
        return perplexity_stats(model, tokenizer, texts, block_size)["perplexity"]

    loaded, live = load_for_eval(tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", alpha=0.0)
    calls = []
    original = live.set_alpha
    live.set_alpha = lambda a: (calls.append(a), original(a))
    result = run_alpha_sweep(cfg, quiet=True, loaded=loaded, live=live)
    assert calls == [0.0, 0.5, 1.0]

    rows = result["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert len({round(r["ppl"], 6) for r in rows}) == 3  # the mix really changes with α
    assert all(0 <= r["safety"] <= 100 for r in rows)
    # each α's perplexity equals a fresh model loaded at that α (live switching = re-loading)
    fresh, _ = load_for_eval(tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", alpha=0.5)
    from mlx_med.evaluation.perplexity import load_ppl_texts

    assert rows[1]["ppl"] == pytest.approx(perplexity(fresh.model, fresh.tokenizer, load_ppl_texts(ppl), 8), rel=1e-4)

    choice = json.loads((out / "alpha_choice.json").read_text(encoding="utf-8"))
    assert choice["alpha"] == pick_alpha(rows, AlphaRule())[0] and choice["reason"]
    with open(out / "alpha_sweep.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [t["picked"] for t in table].count("✓") == 1 and "safety" in table[0]
    assert (out / "alpha_sweep.png").stat().st_size > 0 and (out / "alpha_0.5" / "metrics.json").exists()


def test_sweep_cli(tiny_llama, eval_file, tmp_path):
    from mlx_med.cli import cli

    out = tmp_path / "cli-dec"
    result = CliRunner().invoke(cli, ["sweep", "decoding", "--model", str(tiny_llama), "--data", str(eval_file),
                                      "-o", str(out), "--max-new-tokens", "3", "--grid", "temperature=0,0.5",
                                      "-q"])
    assert result.exit_code == 0, result.output
    assert len(read_table(out / "decoding_sweep.csv")) == 2
    result = CliRunner().invoke(cli, ["sweep", "alpha", "--model", str(tiny_llama), "--data", str(eval_file),
                                      "-o", str(tmp_path / "a"), "--alphas", "0,2"])
    assert result.exit_code == 2 and "[0, 1]" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["sweep", "decoding", "--model", str(tiny_llama), "--data", str(eval_file),
                                      "-o", str(tmp_path / "busy"), "--grid", "temperature=0"])
    assert result.exit_code == 2 and "--force" in result.output
    with pytest.raises(UserError):
        run_decoding_sweep(DecodingSweepConfig(model=tiny_llama, data=eval_file, out=tmp_path / "busy",
                                               grid={"temperature": [0]}), quiet=True)


def read_table(path: Path) -> list[dict]:
    """Rows of a sweep CSV with numbers converted back."""
    import re

    number = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: (float(v) if number.match(v or "") else (v or None)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def test_a_retrained_adapter_is_not_served_old_safety_results(tiny_llama, eval_file, tmp_path):
    probes = tmp_path / "probes.jsonl"
    source = Path(__file__).resolve().parents[1] / "data" / "demo" / "safety_probes.jsonl"
    probes.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    make_adapter(tiny_llama, tmp_path / "pt", rank=4, keys=ALL, seed=1, phase="pt")
    make_adapter(tiny_llama, tmp_path / "sft", rank=4, keys=ALL, seed=2, phase="sft")
    cfg = AlphaSweepConfig(model=tiny_llama, sft=tmp_path / "sft", pt=tmp_path / "pt", data=eval_file,
                           out=tmp_path / "alpha", alphas="1", max_new_tokens=2, safety_probes=probes, limit=1)
    run_alpha_sweep(cfg, quiet=True)
    cache = tmp_path / "alpha" / "alpha_1" / "safety.json"
    first = json.loads(cache.read_text())["key"]
    run_alpha_sweep(cfg, quiet=True)
    assert json.loads(cache.read_text())["key"] == first  # unchanged inputs: reused
    make_adapter(tiny_llama, tmp_path / "sft", rank=4, keys=ALL, seed=3, phase="sft")  # retrained in place
    run_alpha_sweep(cfg, quiet=True)
    assert json.loads(cache.read_text())["key"] != first  # screened again, not served from the cache


def test_measurement_inputs_name_the_same_input_in_a_point_and_in_its_stage():
    # a stage's measurement is reused by a sweep point only when both give the same inputs in the same
    # order: every field named must exist on both configs, and equal settings must read equal
    from dataclasses import fields

    from mlx_med.evaluation.alpha_points import MEASUREMENT_INPUTS, measurement_inputs
    from mlx_med.evaluation.alpha_sweep import AlphaSweepConfig
    from mlx_med.evaluation.mcq import McqEvalConfig
    from mlx_med.evaluation.runner import EvalConfig

    stage_types = {"ppl": EvalConfig, "mcq": McqEvalConfig}
    assert set(MEASUREMENT_INPUTS) == set(stage_types)
    for name, mapping in MEASUREMENT_INPUTS.items():
        assert set(mapping) <= {f.name for f in fields(AlphaSweepConfig)}, name
        assert set(mapping.values()) <= {f.name for f in fields(stage_types[name])}, name
    point = AlphaSweepConfig(model=Path("m"), ppl_data=Path("p.jsonl"), ppl_limit=5, ppl_block_size=128,
                       mcq_data=Path("q.jsonl"), mcq_limit=2, mcq_shots=1, mcq_shots_data=Path("s.jsonl"),
                       system="be brief")
    mcq = McqEvalConfig(model=Path("m"), data=Path("q.jsonl"), limit=2, shots=1, shots_data=Path("s.jsonl"),
                        system="be brief")
    assert measurement_inputs("mcq", point) == measurement_inputs("mcq", mcq, stage=True)
    assert measurement_inputs("mcq", point) == [Path("q.jsonl"), 2, 1, Path("s.jsonl"), "be brief"]
    assert measurement_inputs("ppl", point) == measurement_inputs("ppl", point, stage=True) == [
        Path("p.jsonl"), 5, 128]
