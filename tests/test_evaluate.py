"""Eval runner: files and fields, bad rows, resume, perplexity against transformers, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_med  # noqa: F401
from mlx_med.errors import UserError
from mlx_med.evaluation.perplexity import perplexity_stats
from mlx_med.evaluation.runner import (
    EvalConfig,
    load_eval_rows,
    read_partial,
    run_eval,
    score_predictions,
)

ROWS = [
    {"messages": [{"role": "user", "content": "高血压患者应该注意什么？"},
                  {"role": "assistant", "content": "高血压患者应低盐饮食，规律服用降压药。"}]},
    {"prompt": "Is aspirin indicated after a stroke?", "response": "Yes, for ischemic stroke.",
     "final_decision": "yes"},
    {"messages": [{"role": "system", "content": "You are a doctor."},
                  {"role": "user", "content": "fever"},
                  {"role": "assistant", "content": "Rest and fluids."},
                  {"role": "user", "content": "and cough?"},
                  {"role": "assistant", "content": "See a doctor if it lasts."}]},
    {"prompt": "糖尿病怎么治疗？", "output": "糖尿病患者需要定期监测血糖，控制饮食。"},
    {"prompt": "Diabetes?", "label": "Monitor blood glucose."},
]


def write_jsonl(path: Path, rows, extra_lines=()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def eval_file(tmp_path) -> Path:
    bad = ['{"messages": [{"role": "user", "content": "no answer"}]}', "{not json", '{"prompt": 3, "response": "x"}']
    return write_jsonl(tmp_path / "eval.jsonl", ROWS[:2] + ROWS[2:], extra_lines=bad)


def test_rows_are_split_at_the_last_assistant_turn(eval_file):
    evalset = load_eval_rows(eval_file)
    assert len(evalset.rows) == 5 and evalset.bad == 3
    assert any(":7" in reason for reason in evalset.bad_reasons)  # bad rows named by line
    multi = evalset.rows[2]
    assert multi.reference == "See a doctor if it lasts." and multi.messages[-1]["content"] == "and cough?"
    assert evalset.rows[1].label == "yes" and evalset.rows[0].label is None
    assert [r.reference for r in evalset.rows[3:]] == [ROWS[3]["output"], ROWS[4]["label"]]
    assert len(load_eval_rows(eval_file, limit=2).rows) == 2


def test_run_eval_writes_llamafactory_files(tiny_llama, eval_file, tmp_path):
    out = tmp_path / "out"
    cfg = EvalConfig(model=tiny_llama, data=eval_file, out=out, max_new_tokens=6, batch_size=2)
    metrics = run_eval(cfg, quiet=True)
    lines = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5 and all(set(x) == {"prompt", "predict", "label"} for x in lines)
    assert [x["label"] for x in lines][0] == ROWS[0]["messages"][1]["content"]  # data order kept
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert on_disk[key] == pytest.approx(metrics[key]) and key in on_disk["llamafactory"]
    assert on_disk["bad_rows"]["count"] == 3 and on_disk["choice"]["n"] == 1
    assert on_disk["config"]["decoding"]["max_new_tokens"] == 6
    assert not (out / "predictions.partial.jsonl").exists()
    with pytest.raises(UserError, match="already holds a finished eval"):
        run_eval(cfg, quiet=True)
    # re-scoring the written predictions file (the LLaMA-Factory layout) gives the same numbers
    rescored = score_predictions(out / "generated_predictions.jsonl", quiet=True)
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert rescored[key] == pytest.approx(metrics[key], abs=1e-9)
    assert rescored["sacrebleu"] == metrics["sacrebleu"]
    # greedy is deterministic: forcing a re-run gives the same predictions
    cfg.force = True
    run_eval(cfg, quiet=True)
    again = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert again == lines


def test_interrupted_eval_resumes(tiny_llama, eval_file, tmp_path):
    full = tmp_path / "full"
    run_eval(EvalConfig(model=tiny_llama, data=eval_file, out=full, max_new_tokens=5), quiet=True)
    expected = (full / "generated_predictions.jsonl").read_text(encoding="utf-8")

    # Simulate a crash: two predictions made, the third torn mid-line.
    out = tmp_path / "resumed"
    cfg = EvalConfig(model=tiny_llama, data=eval_file, out=out, max_new_tokens=5)
    from mlx_med.evaluation.decoding import DecodingConfig
    from mlx_med.evaluation.runner import prepare_out_dir, run_state

    prepare_out_dir(out, run_state(cfg, cfg.decoding()), force=False)
    made = [json.loads(x) for x in expected.splitlines()]
    partial = out / "predictions.partial.jsonl"
    marker = "RESUMED-FROM-DISK"
    with open(partial, "w", encoding="utf-8") as f:
        for i in (3, 0):
            rec = {**made[i], "predict": marker, "index": i, "generation_tokens": 1, "finish_reason": "stop"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.write('{"index": 1, "prompt": "tor')
    assert set(read_partial(partial)) == {0, 3}

    metrics = run_eval(cfg, quiet=True)
    lines = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["predict"] == marker for x in lines] == [True, False, False, True, False]  # 0 and 3 not redone
    assert [x["predict"] for x in lines][1:3] == [made[1]["predict"], made[2]["predict"]]
    assert metrics["throughput"]["resumed"] == 2 and metrics["throughput"]["sequences"] == 3

    # a partial run with other settings is not silently mixed in
    other = tmp_path / "other"
    prepare_out_dir(other, run_state(cfg, cfg.decoding()), force=False)
    partial2 = other / "predictions.partial.jsonl"
    partial2.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="different model, data or decoding"):
        run_eval(EvalConfig(model=tiny_llama, data=eval_file, out=other, max_new_tokens=7), quiet=True)
    assert DecodingConfig().greedy


def test_perplexity_matches_transformers(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from mlx_med.models import load_model

    texts = ["The patient presented with fever, cough and shortness of breath for three days.",
             "高血压患者应低盐饮食，规律服用降压药。"]
    loaded = load_model(tiny_llama)
    ours = perplexity(loaded.model, loaded.tokenizer, texts, block_size=16)

    # The same blocks through transformers: joined with EOS, blocks of 17 tokens overlapping by one.
    stream = []
    for t in texts:
        stream += list(loaded.tokenizer.encode(t)) + [loaded.tokenizer.eos_token_id]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(stream), 16):
            block = stream[i:i + 17]
            if len(block) < 2:
                continue
            ids = torch.tensor([block])
            loss = hf(ids, labels=ids).loss.item()
            total += loss * (len(block) - 1)
            count += len(block) - 1
    assert ours == pytest.approx(math.exp(total / count), rel=1e-4)
    assert ours > 1.0


def test_cli_contract_form(tiny_llama, eval_file, tmp_path):
    from mlx_med.cli import cli

    out = tmp_path / "cli-out"
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data", str(eval_file), "-o", str(out),
                                      "--limit", "2", "--max-new-tokens", "4", "--preset", "greedy",
                                      "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "bleu-4" in result.output and "rouge-l" in result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n"] == 2 and {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "sacrebleu", "rouge_score"} <= set(metrics)

    scored = CliRunner().invoke(cli, ["eval", "--predictions", str(out / "generated_predictions.jsonl"),
                                      "-o", str(tmp_path / "scored"), "-q"])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "scored" / "metrics.json").read_text())["bleu-4"] == pytest.approx(metrics["bleu-4"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"predict": "a", "label": "b"}\n{"predict": 1, "label": "b"}\n', encoding="utf-8")
    scored = CliRunner().invoke(cli, ["eval", "--predictions", str(broken)])
    assert scored.exit_code == 2 and "broken.jsonl:2: field 'predict'" in scored.output

    bad = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data", str(tmp_path / "missing.jsonl"),
                                   "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not found" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data", str(eval_file),
                                   "-o", str(tmp_path / "y"), "--top-p", "0"])
    assert bad.exit_code == 2 and "top_p" in bad.output


def test_system_keywords_resolve(tmp_path):
    from mlx_med.evaluation.runner import EvalRow, system_text
    from mlx_med.prompts import system_prompt

    zh = [EvalRow(0, "x:1", [{"role": "user", "content": "发热怎么办？"}], "多喝水")]
    en = [EvalRow(0, "x:1", [{"role": "user", "content": "Fever?"}], "Rest")]
    assert system_text(None, "auto", en) is None
    assert system_text("none", "auto", en) is None  # the keyword, never the literal text "none"
    assert system_text("default", "auto", zh) == system_prompt("zh")
    assert system_text("default", "auto", en) == system_prompt("en")
    (tmp_path / "sys.txt").write_text("Be brief.")
    assert system_text(f"@{tmp_path / 'sys.txt'}", "auto", en) == "Be brief."
    assert system_text("You are careful.", "auto", en) == "You are careful."


def perplexity(model, tokenizer, texts, block_size=512) -> float:
    return perplexity_stats(model, tokenizer, texts, block_size)["perplexity"]


def test_max_new_tokens_is_capped_by_the_context_window(tiny_llama, tmp_path, capsys):
    window = json.loads((tiny_llama / "config.json").read_text())["max_position_embeddings"]
    data = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q?", "response": "a"}])
    metrics = run_eval(EvalConfig(model=tiny_llama, data=data, out=tmp_path / "o", max_new_tokens=window * 4),
                       quiet=False)
    assert f"capped to {window}" in capsys.readouterr().err
    assert metrics["config"]["decoding"]["max_new_tokens"] == window
