"""MCQ suite: record parsing, option scores against a direct mlx-lm computation, the batched path,
lm-eval's length normalisation, Wilson intervals, a model trained to prefer the answer, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_med  # noqa: F401
from mlx_med.data.mcq import parse_mcq_record, read_mcq
from mlx_med.errors import DataError, UserError
from mlx_med.evaluation.mcq import accuracy_entry, mcq_metrics, pick_shots, score_items, wilson_interval
from mlx_med.evaluation.mcq_scoring import encode_item, pick, question_text, score_options

ITEMS = [
    {"question": "Which organ pumps blood?", "options": {"A": "heart", "B": "the left kidney", "C": "liver"},
     "answer": "A", "lang": "en", "category": "anatomy"},
    {"question": "最易引起直立性低血压的药物是", "options": {"A": "肼屈嗪", "B": "卡托普利", "C": "α-甲基多巴", "D": "胍乙啶"},
     "answer": "D", "lang": "zh"},
    {"question": "Insulin is made in the", "options": ["pancreas", "spleen", "stomach lining", "skin"],
     "answer": "A", "subject": "physiology"},
]


def write_jsonl(path: Path, rows, extra_lines=()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- records


def test_pubmedqa_rows_parse_as_three_option_items(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Context:\nAspirin trial.\n\nQuestion: Does aspirin help?"},
                         {"role": "assistant", "content": "Yes, it does."}], "pubid": "123", "final_decision": "maybe"}
    raw = {"question": "Do statins lower LDL?", "context": ["Para one.", "Para two."], "final_decision": "Yes"}
    item = parse_mcq_record(chat, tmp_path / "f.jsonl", 1)
    assert item.options == {"A": "yes", "B": "no", "C": "maybe"} and item.answer == "C"
    assert item.id == "123" and "Aspirin trial." in item.question and "Does aspirin help?" in item.question
    assert item.category == "pubmedqa" and item.lang == "en"
    item = parse_mcq_record(raw, tmp_path / "f.jsonl", 2)
    assert item.answer == "A" and item.question.startswith("Context:\nPara one.\nPara two.")
    assert item.question.endswith("Question: Do statins lower LDL?")
    with pytest.raises(DataError, match=r"f.jsonl:3: field 'final_decision'"):
        parse_mcq_record({**raw, "final_decision": "perhaps"}, tmp_path / "f.jsonl", 3)


def test_shipped_pubmedqa_eval_file_reads_as_mcq():
    data = Path(__file__).resolve().parents[1] / "data" / "demo" / "eval_pubmedqa_en.jsonl"
    items = read_mcq(data).items
    assert len(items) == 100 and all(len(i.options) == 3 for i in items)
    assert {i.answer for i in items} <= {"A", "B", "C"}


def test_bad_rows_are_counted_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", ITEMS, extra_lines=[
        "not json",
        json.dumps({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "C"}),
        json.dumps({"question": "q", "options": {"A": "x"}, "answer": "A"}),
        json.dumps({"question": "q", "options": {"A": "x", "BB": "y"}, "answer": "A"}),
    ])
    got = read_mcq(path)
    assert [i.answer for i in got.items] == ["A", "D", "A"] and got.bad == 4
    assert got.bad_reasons[0].startswith(f"{path}:4: not valid JSON")
    assert got.bad_reasons[1] == f"{path}:5: field 'answer': must be one of the option letters A, B, got 'C'"
    assert "q.jsonl:6: field 'options'" in got.bad_reasons[2] and "q.jsonl:7: field 'options.BB'" in got.bad_reasons[3]
    assert got.items[1].category is None and got.items[2].category == "physiology"
    assert got.items[2].lang == "en" and got.items[2].options["B"] == "spleen"
    with pytest.raises(UserError, match="no usable multiple-choice items"):
        read_mcq(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}]))


def test_prompt_follows_lm_eval_layout(tmp_path):
    item = read_mcq(write_jsonl(tmp_path / "q.jsonl", ITEMS)).items[0]
    assert question_text(item) == ("Which organ pumps blood?\nA. heart\nB. the left kidney\nC. liver\nAnswer:")


# --------------------------------------------------------------------------- metrics


def test_length_normalisation_is_lm_evals_acc_norm():
    # lm-eval: acc = argmax(ll); acc_norm = argmax(ll / len(choice)), len in characters
    assert pick([-4.0, -3.0]) == 1
    assert pick([-4.0, -3.0], [len("A. a long answer"), len("B. no")]) == 0  # -0.25 vs -0.6
    assert pick([-6.0, -3.0], [6, 3]) == 0  # a tie (-1.0 each) goes to the first, as np.argmax does
    assert pick([-2.0, -2.0, -1.0], [4, 2, 1]) == 0  # -0.5, -1, -1
    # characters, not bytes: "肼屈嗪" is 3 characters (9 UTF-8 bytes)
    assert pick([-3.3, -4.0], [len("A. 肼屈嗪"), len("B. abcdef")]) == 1  # -0.55 vs -0.44


def test_wilson_interval_matches_the_formula_and_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(49.02, abs=0.01) and hi == pytest.approx(94.33, abs=0.01)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(100.0)
    assert wilson_interval(0, 0) == (0.0, 100.0)
    records = [{"correct": c, "correct_norm": not c, "lang": "en", "category": None} for c in (1, 1, 1, 0)]
    entry = accuracy_entry(records)
    assert entry["accuracy"] == 75.0 and entry["accuracy_norm"] == 25.0
    assert entry["interval95"]["accuracy"] == list(wilson_interval(3, 4))
    assert mcq_metrics(records)["by_category"]["(none)"]["n"] == 4


def test_shots_never_include_the_item_itself(tmp_path):
    items = read_mcq(write_jsonl(tmp_path / "q.jsonl", ITEMS)).items
    shots = pick_shots(items, items, 2)
    assert [[s.answer for s in row] for row in shots] == [["D", "A"], ["A", "A"], ["A", "D"]]
    assert all(item not in row for item, row in zip(items, shots))


# --------------------------------------------------------------------------- scores (tiny models)


def direct_scores(model, tokenizer, encoded) -> list[float]:
    """Each option scored on its own: one mlx-lm forward over prompt + option, log-softmax, summed."""
    import mlx.core as mx
    import mlx.nn as nn

    scores = []
    for cont in encoded.continuations:
        tokens = encoded.prefix + cont
        logprobs = nn.log_softmax(model(mx.array(tokens)[None]).astype(mx.float32), axis=-1)[0]
        scores.append(sum(logprobs[len(encoded.prefix) + j - 1, t].item() for j, t in enumerate(cont)))
    return scores


def test_scores_equal_a_direct_mlx_lm_computation_and_batched_equals_unbatched(tiny_model, tmp_path):
    from mlx_med.models import load_model

    loaded = load_model(tiny_model)
    items = read_mcq(write_jsonl(tmp_path / "q.jsonl", ITEMS)).items
    for item, shots in zip(items, pick_shots(items, items, 1)):
        encoded = encode_item(loaded.tokenizer, item, shots)
        assert len({len(c) for c in encoded.continuations}) > 1  # options of different lengths: padding is exercised
        batched = score_options(loaded.model, encoded, shared_prefix=True)
        separate = score_options(loaded.model, encoded, shared_prefix=False)
        reference = direct_scores(loaded.model, loaded.tokenizer, encoded)
        assert batched == pytest.approx(reference, rel=1e-4, abs=1e-3)
        assert separate == pytest.approx(reference, rel=1e-4, abs=1e-3)
        assert all(math.isfinite(s) and s < 0 for s in batched)


def test_continuations_split_as_lm_eval_does(tiny_llama, tmp_path):
    from mlx_med.models import load_model

    tokenizer = load_model(tiny_llama).tokenizer
    item = read_mcq(write_jsonl(tmp_path / "q.jsonl", ITEMS)).items[0]
    encoded = encode_item(tokenizer, item)
    context = tokenizer.apply_chat_template([{"role": "user", "content": question_text(item)}],
                                            add_generation_prompt=True, tokenize=False)
    for text, cont in zip(encoded.texts, encoded.continuations):
        whole = tokenizer.encode(context + text, add_special_tokens=False)
        assert encoded.prefix + cont == whole
        assert tokenizer.decode(cont).strip() == text


def test_a_model_trained_to_prefer_the_answer_scores_100(tiny_llama, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_med.models import load_model

    loaded = load_model(tiny_llama)
    model, tokenizer = loaded.model, loaded.tokenizer
    path = write_jsonl(tmp_path / "q.jsonl", ITEMS)
    items = read_mcq(path).items
    before = score_items(model, tokenizer, items).records
    # fine-tune the whole tiny model on the right continuations only
    examples = []
    for item in items:
        encoded = encode_item(tokenizer, item)
        right = encoded.continuations[list(item.options).index(item.answer)]
        examples.append((encoded.prefix + right, len(encoded.prefix)))

    def loss_fn(model):
        total = mx.array(0.0)
        for tokens, start in examples:
            x = mx.array(tokens)[None]
            logits = model(x[:, :-1])[0, start - 1:]
            total = total + nn.losses.cross_entropy(logits, x[0, start:], reduction="sum")
        return total

    optimizer = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss_fn)
    for _ in range(40):
        _, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    records = score_items(model, tokenizer, items).records
    assert [r["correct"] for r in records] == [True, True, True]
    assert mcq_metrics(records)["accuracy"] == 100.0
    assert [r["scores"][r["answer"]] for r in records] > [r["scores"][r["answer"]] for r in before]


# --------------------------------------------------------------------------- CLI


def test_eval_suite_mcq_cli(tiny_llama, tmp_path):
    from mlx_med.cli import cli

    data = write_jsonl(tmp_path / "q.jsonl", ITEMS, extra_lines=["{bad"])
    dev = write_jsonl(tmp_path / "dev.jsonl", ITEMS[:2])
    out = tmp_path / "out"
    args = ["eval", "--suite", "mcq", "--model", str(tiny_llama), "--data", str(data), "-o", str(out),
            "--limit", "2", "--shots", "1", "--shots-data", str(dev), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (out / "mcq_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert metrics["n"] == 2 and len(rows) == 2 and metrics["shots"] == 1
    assert set(rows[0]) >= {"id", "choice", "scores", "answer", "correct"}
    assert set(rows[1]["scores"]) == {"A", "B", "C", "D"}
    assert metrics["accuracy"] == 50.0 * sum(r["correct"] for r in rows)
    assert set(metrics["by_language"]) == {"en", "zh"} and "anatomy" in metrics["by_category"]
    assert len(metrics["interval95"]["accuracy"]) == 2 and "accuracy_norm" in metrics
    from mlx_med.evaluation.report import build_report

    report = build_report([out])
    assert "## Multiple-choice accuracy" in report and f"| {metrics['accuracy']:.1f} |" in report
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "already exists" in again.output
    missing = CliRunner().invoke(cli, ["eval", "--suite", "mcq", "--model", str(tiny_llama),
                                       "--data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o2")])
    assert missing.exit_code != 0 and "MCQ file not found" in missing.output and "Traceback" not in missing.output
