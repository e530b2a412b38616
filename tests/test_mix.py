"""The adapter mix: one α range rule and conflict rule for every command, α schedules, and fused − base
checked against the PEFT exports through Hugging Face float32 checkpoints of a 4-bit base."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from random_adapters import ALL, make_adapter

from mlx_med.adapters.fuse import fuse_model
from mlx_med.adapters.live import load_with_adapters
from mlx_med.adapters.merge import merge_adapters, to_numpy
from mlx_med.adapters.mix import load_pair, resolve_mix
from mlx_med.adapters.schedule import DEFAULT_ALPHA, AlphaSchedule, load_schedule
from mlx_med.cli import cli
from mlx_med.errors import DataError, UserError
from mlx_med.models import load_model

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 11]])
SCHEDULE = {"default": 0.3, "rules": [
    {"layers": "1", "modules": ["gate_proj", "up_proj", "down_proj"], "alpha": 0.9},
    {"modules": "q_proj", "alpha": 0.0},
    {"layers": ["0-1"], "modules": ["q_proj"], "alpha": 1.0},  # later rule wins over the one above
]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("mix-runs")
    make_adapter(tiny_llama, root / "pt", rank=4, lora_alpha=8, keys=ALL, seed=1, phase="pt", std=0.05)
    make_adapter(tiny_llama, root / "sft", rank=2, lora_alpha=16, keys=ALL, seed=2, phase="sft", std=0.05)
    (root / "schedule.yaml").write_text(yaml.safe_dump(SCHEDULE))
    return root


def write_schedule(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def hand_alpha(module: str) -> float:
    """SCHEDULE applied by hand."""
    layer = int(module.split(".layers.")[1].split(".")[0])
    kind = module.rsplit(".", 1)[-1]
    if kind == "q_proj":
        return 1.0
    if layer == 1 and kind in ("gate_proj", "up_proj", "down_proj"):
        return 0.9
    return 0.3


# ---------------------------------------------------------------------------- the rule, per command


def invoke(*args, stdin: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=stdin)


def test_fuse_refuses_alpha_with_explicit_weights(runs, tiny_llama, tmp_path):
    """``fuse --alpha 0.3 --w-sft 1 --w-pt 1`` used to drop α silently; it is a conflict, as in merge."""
    result = invoke("fuse", "--model", tiny_llama, "--sft", runs / "sft", "--pt", runs / "pt", "--alpha", "0.3",
                    "--w-sft", "1", "--w-pt", "1", "-o", tmp_path / "fused")
    assert result.exit_code == 2 and "not both" in result.output, result.output
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("verb", ["fuse", "merge"])
def test_fuse_and_merge_range_and_conflicts(verb, runs, tiny_llama, tmp_path):
    model = ["--model", tiny_llama] if verb == "fuse" else []
    pair = [*model, "--sft", runs / "sft", "--pt", runs / "pt", "-o", tmp_path / "out"]
    out_of_range = invoke(verb, *pair, "--alpha", "1.5")
    assert out_of_range.exit_code == 2 and "[0, 1], got 1.5" in out_of_range.output
    assert "--w-sft" in out_of_range.output  # says how to weigh outside [0, 1]
    conflict = invoke(verb, *pair, "--w-sft", "1", "--alpha-schedule", runs / "schedule.yaml")
    assert conflict.exit_code == 2 and "not both" in conflict.output
    # explicit weights may extrapolate (any finite numbers)
    assert not (tmp_path / "out").exists()
    ok = invoke(verb, *pair, "--w-sft", "1.5", "--w-pt", "-0.5", "-q")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out").is_dir()


def test_eval_range_and_conflicts(runs, tiny_llama, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    common = ["eval", "--model", tiny_llama, "--data", data, "-o", tmp_path / "e"]
    bad = invoke(*common, "--sft", runs / "sft", "--pt", runs / "pt", "--alpha", "-0.2")
    assert bad.exit_code == 2 and "[0, 1], got -0.2" in bad.output
    conflict = invoke(*common, "--adapter", runs / "sft", "--alpha-schedule", runs / "schedule.yaml")
    assert conflict.exit_code == 2 and "weight 1" in conflict.output
    safety = invoke("eval", "--suite", "safety", "--model", tiny_llama, "-o", tmp_path / "s", "--adapter",
                    runs / "sft", "--alpha", "0.4")
    assert safety.exit_code == 2 and "weight 1" in safety.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_sweep_alpha_range_and_conflicts(runs, tiny_llama, tmp_path):
    common = ["sweep", "alpha", "--model", tiny_llama, "--data", tmp_path / "d.jsonl", "-o", tmp_path / "sw"]
    bad = invoke(*common, "--sft", runs / "sft", "--pt", runs / "pt", "--alphas", "0,1.2")
    assert bad.exit_code == 2 and "[0, 1], got 1.2" in bad.output
    conflict = invoke(*common, "--sft", runs / "sft", "--alpha-schedule", runs / "schedule.yaml")
    assert conflict.exit_code == 2 and "go together" in conflict.output


def test_chat_range_and_conflicts(runs, tiny_llama):
    bad = invoke("chat", "--model", tiny_llama, "--sft", runs / "sft", "--pt", runs / "pt", "--alpha", "2",
                 stdin="hi\n")
    assert bad.exit_code == 2 and "[0, 1], got 2" in bad.output
    conflict = invoke("chat", "--model", tiny_llama, "--adapter", runs / "sft", "--alpha", "0.3", stdin="hi\n")
    assert conflict.exit_code == 2 and "weight 1" in conflict.output


def test_chat_slash_alpha_keeps_the_rule_and_the_schedule(runs, tiny_llama):
    from mlx_med.chat.repl import ChatSession, handle_command
    from mlx_med.evaluation.decoding import DecodingConfig

    loaded, live = load_with_adapters(tiny_llama, sft=runs / "sft", pt=runs / "pt",
                                      alpha_schedule=runs / "schedule.yaml")
    session = ChatSession(loaded.model, loaded.tokenizer, DecodingConfig(), adapters=live)
    assert handle_command(session, "/alpha 1.5").text.startswith("error: /alpha must be in [0, 1], got 1.5")
    assert session.alpha == pytest.approx(0.3)
    reply = handle_command(session, "/alpha 0.6").text
    assert reply.startswith("α = 0.6") and "rules stay" in reply
    q = "model.layers.0.self_attn.q_proj"
    assert live.schedule.alpha_for(q) == 1.0 and live.schedule.alpha_for("model.layers.0.mlp.up_proj") == 0.6


def test_pipeline_range_and_bad_schedule(tmp_path):
    cfg = {"output": str(tmp_path / "out"), "pt": {"data": {"train": "pt.jsonl"}},
           "sft": {"data": {"train": "sft.jsonl"}}, "eval": {"data": ["eval.jsonl"]}, "fuse": {"alpha": 0.5}}
    path = write_schedule(tmp_path / "p.yaml", cfg)
    bad = invoke("pipeline", "-c", path, "-q", "--alpha", "1.5")
    assert bad.exit_code == 2 and "fuse.alpha must be in [0, 1], got 1.5" in bad.output
    broken = write_schedule(tmp_path / "s.yaml", {"default": 0.5, "rules": [{"layers": "3-1", "alpha": 0.2}]})
    write_schedule(path, {**cfg, "fuse": {"alpha_schedule": str(broken)}})
    result = invoke("pipeline", "-c", path, "-q")
    assert result.exit_code == 2 and "s.yaml: field 'rules[0].layers'" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ schedules


def test_schedule_file_and_constant():
    plain = AlphaSchedule.constant(0.25)
    assert plain.is_constant and plain.weights_for("model.layers.7.mlp.up_proj") == {"sft": 0.25, "pt": 0.75}
    assert AlphaSchedule().default == DEFAULT_ALPHA == 0.5


def test_bad_rules_name_file_rule_and_field(runs, tmp_path):
    cases = [
        ({"rules": [{"alpha": 0.1}, {"layers": "20-29", "alpha": 0.2}]}, "rules[1].layers", "layer 20"),
        ({"rules": [{"modules": ["gate_prj"], "alpha": 0.2}]}, "rules[0].modules", "'gate_prj'"),
    ]
    for n, (data, field, problem) in enumerate(cases):
        path = write_schedule(tmp_path / f"s{n}.yaml", data)
        with pytest.raises(DataError, match=re.escape(f"s{n}.yaml: field '{field}': {problem}")) as err:
            resolve_mix(sft=runs / "sft", pt=runs / "pt", schedule=path)
        assert err.value.field == field
    parse_errors = [
        ({"rules": [{"layers": "a-b", "alpha": 0.2}]}, "rules[0].layers"),
        ({"rules": [{"alpha": 1.5}]}, "rules[0].alpha"),
        ({"rules": [{"modules": ["q_proj"]}]}, "rules[0].alpha"),
        ({"rules": [{"alpha": 0.1, "layer": "1"}]}, "rules[0].layer"),
        ({"default": "half"}, "default"),
    ]
    for n, (data, field) in enumerate(parse_errors):
        with pytest.raises(DataError) as err:
            load_schedule(write_schedule(tmp_path / f"p{n}.yaml", data))
        assert err.value.field == field and err.value.path.endswith(f"p{n}.yaml")


def test_schedule_fused_weights_equal_hand_sums(runs, tiny_llama, tmp_path):
    fuse_model(tiny_llama, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt",
               alpha_schedule=runs / "schedule.yaml", dtype="float32")
    base = dict(load_model(tiny_llama, compute=False).model.named_modules())
    fused = dict(load_model(tmp_path / "fused", compute=False).model.named_modules())
    adapters = load_pair(runs / "sft", runs / "pt")
    seen = set()
    for module in adapters["sft"].modules():
        a = hand_alpha(module)
        seen.add(a)
        want = a * to_numpy(adapters["sft"].delta(module)) + (1 - a) * to_numpy(adapters["pt"].delta(module))
        got = np.array(fused[module].weight) - np.array(base[module].weight.astype(mx.float32))
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert seen == {0.3, 0.9, 1.0}
    report = json.loads((tmp_path / "fused" / "fuse_report.json").read_text())
    assert report["alpha_schedule"]["default"] == 0.3 and len(report["alpha_schedule"]["rules"]) == 3


def test_live_schedule_equals_fused_logits(runs, tiny_llama, tmp_path):
    loaded, live = load_with_adapters(tiny_llama, sft=runs / "sft", pt=runs / "pt", alpha=0.0)
    plain = np.array(loaded.model(TOKENS))
    loaded, live = load_with_adapters(tiny_llama, sft=runs / "sft", pt=runs / "pt",
                                      alpha_schedule=runs / "schedule.yaml")
    got = np.array(loaded.model(TOKENS))
    fuse_model(tiny_llama, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt",
               alpha_schedule=runs / "schedule.yaml", dtype="float32")
    fused = np.array(load_model(tmp_path / "fused").model(TOKENS))
    np.testing.assert_allclose(got, fused, atol=2e-4, rtol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
    # moving the default keeps the rules: equal to fusing the schedule with --alpha as its default
    live.set_alpha(0.8)
    fuse_model(tiny_llama, tmp_path / "fused-08", sft=runs / "sft", pt=runs / "pt", alpha=0.8,
               alpha_schedule=runs / "schedule.yaml", dtype="float32")
    np.testing.assert_allclose(np.array(loaded.model(TOKENS)),
                               np.array(load_model(tmp_path / "fused-08").model(TOKENS)), atol=2e-4, rtol=1e-4)


def test_linear_merge_with_schedule_is_exact(runs):
    mix = resolve_mix(sft=runs / "sft", pt=runs / "pt", schedule=runs / "schedule.yaml")
    result = merge_adapters(mix.adapters, mix.weights, "linear", schedule=mix.schedule)
    assert result.adapter.rank == 6
    for module in mix.adapters["sft"].modules():
        a = hand_alpha(module)
        want = a * to_numpy(mix.adapters["sft"].delta(module)) + (1 - a) * to_numpy(mix.adapters["pt"].delta(module))
        np.testing.assert_allclose(to_numpy(result.adapter.delta(module)), want, atol=1e-6)
    assert result.adapter.meta.extra["merge"]["alpha_schedule"]["default"] == 0.3


def test_schedule_on_a_single_adapter_is_refused(runs):
    with pytest.raises(UserError, match="weight 1"):
        resolve_mix(adapter=runs / "sft", schedule=runs / "schedule.yaml")


# ------------------------------------------------------------------------- one dequantization rule


def test_fused_minus_base_in_hf_equals_peft_delta_on_a_4bit_base(runs, tiny_llama, tmp_path):
    """Fuse into a 4-bit base (fp16 scales), export fused and base to HF float32, and compare their difference with
    0.3·ΔW_sft + 0.7·ΔW_pt recomputed from the PEFT exports (scaling · B @ A), to 1e-4 relative."""
    from mlx_lm.utils import load, quantize_model, save
    from safetensors.numpy import load_file

    model, tokenizer, config = load(str(tiny_llama), return_config=True)
    model.set_dtype(mx.float16)  # fp16 scales and biases, as a GGUF or an fp16 checkpoint gives
    model, config = quantize_model(model, config, group_size=32, bits=4)
    assert model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    q4 = tmp_path / "q4"
    save(q4, tiny_llama, model, tokenizer, config, donate_model=False)
    for args in (["export", q4, "-o", tmp_path / "base-hf", "--dtype", "float32"],
                 ["fuse", "--model", q4, "--sft", runs / "sft", "--pt", runs / "pt", "--alpha", "0.3",
                  "-o", tmp_path / "fused", "--dtype", "float32", "--export-hf", tmp_path / "fused-hf"],
                 ["export-adapter", runs / "sft", "-o", tmp_path / "sft-peft"],
                 ["export-adapter", runs / "pt", "-o", tmp_path / "pt-peft"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    base = load_file(str(tmp_path / "base-hf" / "model.safetensors"))
    fused = load_file(str(tmp_path / "fused-hf" / "model.safetensors"))

    def peft_delta(folder: Path, module: str) -> np.ndarray:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        w = load_file(str(folder / "adapter_model.safetensors"))
        a = w[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = w[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        return cfg["lora_alpha"] / cfg["r"] * (b @ a)

    modules = load_pair(runs / "sft", runs / "pt")["sft"].modules()
    worst = 0.0
    for module in modules:
        want = 0.3 * peft_delta(tmp_path / "sft-peft", module) + 0.7 * peft_delta(tmp_path / "pt-peft", module)
        key = f"{module}.weight"
        got = fused[key].astype(np.float64) - base[key].astype(np.float64)
        worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    assert worst < 1e-4, worst


def test_eval_and_sweep_alpha_honour_the_schedule(runs, tiny_llama, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "fever and cough", "response": "rest and fluids"}) + "\n")
    pair = ["--model", tiny_llama, "--sft", runs / "sft", "--pt", runs / "pt", "--data", data,
            "--alpha-schedule", runs / "schedule.yaml", "--max-new-tokens", "2", "-q"]
    result = invoke("eval", *pair, "-o", tmp_path / "e")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "e" / "metrics.json").read_text())["config"]
    assert config["alpha"] == 0.3 and config["alpha_schedule"] == str(runs / "schedule.yaml")
    result = invoke("sweep", "alpha", *pair, "--alphas", "0,1", "-o", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    for alpha in (0, 1):
        config = json.loads((tmp_path / "sw" / f"alpha_{alpha}" / "metrics.json").read_text())["config"]
        assert config["alpha"] == alpha and config["alpha_schedule"] == str(runs / "schedule.yaml")


MCQ_ITEMS = [
    {"question": "Which organ pumps blood?", "options": {"A": "heart", "B": "kidney", "C": "liver"}, "answer": "A"},
    {"question": "Insulin comes from the", "options": {"A": "skin", "B": "pancreas"}, "answer": "B"},
    {"question": "高血压患者应该", "options": {"A": "低盐饮食", "B": "多吃咸菜", "C": "停药"}, "answer": "A"},
]


def mcq_run(out: Path, *args) -> tuple[dict, list[dict]]:
    """``eval --suite mcq`` → (metrics, per-item option scores)."""
    result = invoke("eval", "--suite", "mcq", *args, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    scores = [json.loads(line)["scores"] for line in (out / "mcq_predictions.jsonl").open(encoding="utf-8")]
    return json.loads((out / "metrics.json").read_text(encoding="utf-8")), scores


def max_gap(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def test_mcq_suite_and_alpha_search_honour_the_schedule(runs, tiny_llama, tmp_path):
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MCQ_ITEMS), encoding="utf-8")
    pair = ["--model", tiny_llama, "--sft", runs / "sft", "--pt", runs / "pt", "--data", mcq]
    # a schedule with no rules is its default α: the same scores as the plain α
    plain, plain_scores = mcq_run(tmp_path / "plain", *pair, "--alpha", "0.7")
    const, const_scores = mcq_run(tmp_path / "const", *pair, "--alpha-schedule",
                                  write_schedule(tmp_path / "const.yaml", {"default": 0.7}))
    assert const_scores == plain_scores and const["accuracy_norm"] == plain["accuracy_norm"]
    assert const["config"]["alpha"] == 0.7 and plain["config"]["alpha"] == 0.7
    # rules change the mix: the scores move, and equal those of the model fused with the same schedule
    ruled, ruled_scores = mcq_run(tmp_path / "ruled", *pair, "--alpha", "0.7", "--alpha-schedule", runs / "schedule.yaml")
    assert ruled["config"]["alpha"] == 0.7 and ruled["config"]["alpha_schedule"] == str(runs / "schedule.yaml")
    assert max_gap(ruled_scores, plain_scores) > 1e-3
    fuse_model(tiny_llama, tmp_path / "fused", sft=runs / "sft", pt=runs / "pt", alpha=0.7,
               alpha_schedule=runs / "schedule.yaml", dtype="float32")
    _, fused_scores = mcq_run(tmp_path / "fused-eval", "--model", tmp_path / "fused", "--data", mcq)
    assert max_gap(ruled_scores, fused_scores) < 2e-3

    # with rules, the α search is a coordinate search over the default and each rule's α; every point's
    # scores are eval's with the schedule written in its folder (also after the base reference, which
    # zeroes both weights on the same live model)
    out = tmp_path / "search"
    search = ["sweep", "alpha", "--model", tiny_llama, "--sft", runs / "sft", "--pt", runs / "pt", "--mcq-data", mcq,
              "--search", "--objective", "accuracy_norm", "--constraint", "accuracy_norm>=0*base", "-o", out, "-q"]
    result = invoke(*search, "--alpha-schedule", runs / "schedule.yaml", "--budget", "4")
    assert result.exit_code == 0, result.output
    choice = json.loads((out / "alpha_search.json").read_text(encoding="utf-8"))
    names = ["default"] + [f"rule{i}" for i in range(len(SCHEDULE["rules"]))]
    assert list(choice["coordinates"]) == names and len(choice["points"]) == 4 and (out / "base" / "mcq.json").exists()
    for point in choice["points"]:
        folder = out / ("schedule_" + "_".join(repr(float(point[name])) for name in names))
        want, want_scores = mcq_run(tmp_path / f"direct-{point['point']}", *pair,
                                    "--alpha-schedule", folder / "alpha_schedule.yaml")
        got_scores = [json.loads(line)["scores"] for line in (folder / "mcq_predictions.jsonl").open(encoding="utf-8")]
        assert max_gap(got_scores, want_scores) < 1e-4, point
        assert point["accuracy"] == want["accuracy"] and point["accuracy_norm"] == want["accuracy_norm"]
    # the cached points belong to the schedule: the same folder without it measures the plain mix again
    result = invoke(*search, "--budget", "3")
    assert result.exit_code == 0, result.output
    _, half_scores = mcq_run(tmp_path / "plain-0.5", *pair, "--alpha", "0.5")
    got = [json.loads(line)["scores"] for line in (out / "alpha_0.5" / "mcq_predictions.jsonl").open(encoding="utf-8")]
    assert max_gap(got, half_scores) < 1e-4
    assert max_gap(half_scores, mcq_run(tmp_path / "ruled-0.5", *pair, "--alpha", "0.5",
                                        "--alpha-schedule", runs / "schedule.yaml")[1]) > 1e-3
