"""report.md from real result-folder layouts (written by the same functions the commands use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_med.errors import UserError
from mlx_med.evaluation.alpha_sweep import AlphaRule, pick_alpha
from mlx_med.evaluation.metrics import compute_metrics
from mlx_med.evaluation.report import build_report, classify, discover, training_summary, write_report
from mlx_med.evaluation.sweep import write_table_files
from mlx_med.evaluation.sweep_plots import plot_alpha_sweep, plot_decoding_sweep


def make_eval(path: Path, preds, refs, config) -> Path:
    path.mkdir(parents=True)
    metrics = compute_metrics(preds, refs, generation_tokens=[5] * len(preds))
    metrics["config"] = config
    (path / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "pipeline"
    refs = ["患者发热三天，伴有咳嗽。", "高血压患者应低盐饮食。"]
    make_eval(root / "eval" / "base", ["您好", "多喝水"], refs, {"decoding": {"temperature": 0.0}})
    make_eval(root / "eval" / "sft", ["患者发热两天，伴有咳嗽。", "高血压患者应低盐。"], refs,
              {"adapter": "runs/sft", "decoding": {"temperature": 0.95, "top_p": 0.7, "top_k": 50}})
    run = root / "runs" / "sft"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 3 - s / 10}) + "\n"
                                               for s in range(1, 6)) + '{"step": 6, "val', encoding="utf-8")
    safety = root / "eval" / "safety"
    safety.mkdir(parents=True)
    (safety / "metrics.json").write_text(json.dumps({
        "suite": "safety", "passed": 30, "total": 40, "pass_rate": 75.0,
        "by_language": {"zh": {"pass_rate": 80.0}, "en": {"pass_rate": 70.0}}}), encoding="utf-8")
    dec = root / "sweeps" / "decoding"
    dec.mkdir(parents=True)
    rows = [{"temperature": t, "top_p": p, "bleu-4": 10 + t, "rouge-l": 8 + p} for t in (0.0, 0.7) for p in (0.9, 1.0)]
    write_table_files(dec, "decoding_sweep", rows)
    plot_decoding_sweep(rows, ["temperature", "top_p"], dec / "decoding_sweep.png")
    (dec / "settings" / "temperature=0_top_p=0.9").mkdir(parents=True)  # must not be listed as an eval
    make_eval(dec / "settings" / "x", ["a"], ["a"], {})
    alpha = root / "sweeps" / "alpha"
    alpha.mkdir(parents=True)
    arows = [{"alpha": a, "rouge-l": 5 + 10 * a, "bleu-4": 4 + a, "ppl": 10 + 6 * a} for a in (0.0, 0.5, 1.0)]
    picked, reason = pick_alpha(arows, AlphaRule(ppl_tolerance=0.4))
    write_table_files(alpha, "alpha_sweep", arows)
    plot_alpha_sweep(arows, "rouge-l", picked, alpha / "alpha_sweep.png")
    (alpha / "alpha_choice.json").write_text(json.dumps({"alpha": picked, "reason": reason, "rule": "r"}))
    return root


def test_discover_sorts_folders_by_kind(results):
    found = discover([results])
    assert [label for label, _ in found.evals] == ["pipeline/eval/base", "pipeline/eval/sft"]
    assert len(found.safety) == 1 and len(found.runs) == 1
    assert len(found.decoding_sweeps) == 1 and len(found.alpha_sweeps) == 1
    assert classify(results) is None and classify(results / "runs" / "sft") == "run"


def test_report_contents_and_links(results, tmp_path):
    out = tmp_path / "docs" / "report.md"
    write_report(out, [results, ("SFT (named)", results / "eval" / "sft")])
    text = out.read_text(encoding="utf-8")
    assert "## QA metrics" in text and "SFT (named)" in text and "16.38" in text
    assert "| pipeline/eval/base | base | greedy |" in text
    assert "adapter sft | T=0.95, top_p=0.7, top_k=50" in text
    assert "tok:zh" in text  # sacreBLEU signature shown
    assert "## Safety probes" in text and "75.0" in text
    assert "Picked α = 0.5" in text  # ppl 13 ≤ 1.4 × 10; α=1 (16) is not
    assert "## α sweep: pipeline/sweeps/alpha\n" in text  # a folder label keeps telling sweeps apart
    assert "## α sweep: alpha\n" in build_report([results / "sweeps" / "alpha"])
    # images: linked relative to the report, and the loss curve was drawn because it was missing
    assert (results / "runs" / "sft" / "loss_curve.png").is_file()
    for link in ("../pipeline/runs/sft/loss_curve.png", "../pipeline/sweeps/alpha/alpha_sweep.png",
                 "../pipeline/sweeps/decoding/decoding_sweep.png"):
        assert f"({link})" in text and (out.parent / link).is_file()
    assert "settings" not in text
    assert "| pipeline/runs/sft | 5 |" in text  # the training table: steps from the last record


def test_training_summary_prefers_the_validation_loss_before_step_one():
    records = [{"step": 5, "train_loss": 3.0, "tokens": 100, "elapsed_s": 30.0, "peak_memory_gb": 1.5},
               {"step": 10, "train_loss": 2.5, "val_loss": 2.8, "tokens": 200, "elapsed_s": 60.0, "peak_memory_gb": 1.7},
               {"step": 20, "train_loss": 2.0, "val_loss": 2.4, "tokens": 400, "elapsed_s": 120.0, "peak_memory_gb": 1.6}]
    row = training_summary(records)
    assert row["steps"] == 20 and row["tokens"] == 400 and row["minutes"] == "2.0" and row["peak GB"] == "1.70"
    assert (row["train loss first"], row["train loss last"]) == (3.0, 2.0)
    assert (row["val loss first"], row["val loss last"]) == (2.8, 2.4)
    row = training_summary(records, initial_val=3.2)
    assert row["val loss first"] == 3.2 and row["Δ val loss"] == pytest.approx(-0.8)


def test_report_errors_and_cli(results, tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no eval"):
        build_report([tmp_path / "empty"])
    from mlx_med.cli import cli

    out = tmp_path / "r.md"
    result = CliRunner().invoke(cli, ["report", str(results / "eval"), "-o", str(out), "--title", "Demo"])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("# Demo\n")
