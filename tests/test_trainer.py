import json
import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_med.adapters.format import read_adapter
from mlx_med.config import load_config
from mlx_med.errors import ConfigError, DataError, UserError
from mlx_med.train.config import TrainConfig
from mlx_med.train.trainer import completed_run, run_training

REPO = Path(__file__).resolve().parents[1]
REPETITIVE = "The patient presented with fever, cough and shortness of breath for three days. "
CHATS = [
    [{"role": "user", "content": "Is aspirin indicated after a stroke?"},
     {"role": "assistant", "content": "Yes, for secondary prevention."}],
    [{"role": "user", "content": "高血压患者应该注意什么？"},
     {"role": "assistant", "content": "低盐饮食，规律服用降压药。"}],
    [{"role": "user", "content": "Fever and cough for three days?"},
     {"role": "assistant", "content": "See a doctor if breathing becomes difficult."}],
    [{"role": "user", "content": "Maximum paracetamol dose?"},
     {"role": "assistant", "content": "Do not exceed the maximum daily dose."}],
] * 3


def pt_data(tmp_path: Path, docs: int = 12) -> Path:
    path = tmp_path / "pt.jsonl"
    path.write_text("".join(json.dumps({"text": REPETITIVE * (2 + i % 3)}) + "\n" for i in range(docs)))
    return path


def sft_data(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CHATS))
    return path


def config(tmp_path: Path, model: Path, data: Path, name: str = "run", **overrides) -> TrainConfig:
    base = {"phase": "pt", "model": str(model), "data.train": str(data), "output": str(tmp_path / name),
            "iters": 6, "max_seq_len": 32, "optim.batch_size": 2, "log_every": 1, "eval.every": 3,
            "optim.learning_rate": 5e-3, "data.cache_dir": str(tmp_path / "cache"), "checkpoint.every": 0}
    return load_config(TrainConfig, None, {**base, **overrides})


def losses(run: Path, key: str = "train_loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_pt_loss_falls_on_repetitive_text(tmp_path, tiny_llama):
    run = run_training(config(tmp_path, tiny_llama, pt_data(tmp_path), iters=30, log_every=5,
                              **{"eval.every": 10, "optim.learning_rate": 1e-2, "lora.alpha": 64}), quiet=True)
    train = losses(run)
    assert train[-1] < train[0] - 0.4, train
    val = losses(run, "val_loss")
    initial = json.loads((run / "done.json").read_text())["initial_val_loss"]
    assert len(val) == 3 and initial > val[0] > val[1] > val[2] and val[2] < initial - 0.6, (initial, val)
    for name in ("adapters.safetensors", "adapter_config.json", "run.yaml", "loss_curve.png", "done.json"):
        assert (run / name).is_file(), name
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "train_loss", "val_loss", "train_ppl", "learning_rate", "tokens_per_sec", "peak_memory_gb"):
        assert key in record
    assert record["tokens"] == 30 * 2 * 32  # packed: every position is a loss token


def test_adapter_delta_is_what_the_model_applies_and_mlx_lm_loads_it(tmp_path, tiny_model):
    from mlx_lm.utils import load as mlx_load

    from mlx_med.models import load_model

    run = run_training(config(tmp_path, tiny_model, pt_data(tmp_path), **{"lora.rank": 4, "lora.alpha": 8}),
                       quiet=True)
    adapter = read_adapter(run)
    meta = adapter.meta
    assert meta.phase == "pt" and meta.base_fingerprint and meta.stacked_on is None
    assert meta.data["train"]["fingerprint"] and adapter.scale == 2.0 and adapter.rank == 4
    assert len(adapter.modules()) == 2 * 7  # every linear of attention + MLP, both layers
    assert all(k.startswith("model.layers.") for k in adapter.weights)
    assert max(float(mx.abs(adapter.delta(m)).max()) for m in adapter.modules()) > 0  # it learned something

    tokens = mx.array([[1, 60, 70, 80, 90, 100, 2]])
    with_lora, _ = mlx_load(str(tiny_model), adapter_path=str(run))
    base = load_model(tiny_model).model
    for module in adapter.modules():
        layer = base
        for part in module.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        layer.weight = layer.weight + adapter.delta(module)
    np.testing.assert_allclose(np.array(with_lora(tokens)), np.array(base(tokens)), atol=2e-4)


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path, tiny_llama):
    data = pt_data(tmp_path)
    common = {"iters": 8, "lora.dropout": 0.1, "checkpoint.every": 4, "optim.grad_accumulation": 2,
              "schedule.warmup_steps": 2}
    whole = run_training(config(tmp_path, tiny_llama, data, "whole", **common), quiet=True)

    class Crash(Exception):
        pass

    def crash_at_6(step, record):
        if step == 6:
            raise Crash

    cfg = config(tmp_path, tiny_llama, data, "crashed", **common)
    with pytest.raises(Crash):
        run_training(cfg, quiet=True, on_step=crash_at_6)
    assert not (tmp_path / "crashed" / "done.json").exists()
    assert len(losses(tmp_path / "crashed")) == 6  # steps 5-6 were logged after the checkpoint at 4
    with pytest.raises(UserError, match="already exists"):
        run_training(cfg, quiet=True)
    run_training(cfg, quiet=True, resume=True)
    np.testing.assert_allclose(losses(tmp_path / "crashed"), losses(whole), rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / "crashed", "val_loss"), losses(whole, "val_loss"), rtol=1e-5)
    a, b = read_adapter(whole), read_adapter(tmp_path / "crashed")
    for key in a.weights:
        np.testing.assert_allclose(np.array(a.weights[key]), np.array(b.weights[key]), atol=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=5)

    def interrupt_at_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, quiet=True, on_step=interrupt_at_2)
    run = Path(cfg.output)
    assert (run / "checkpoints" / "step-0000002" / "optimizer.safetensors").is_file()
    assert (run / "adapters.safetensors").is_file() and not (run / "done.json").exists()
    run_training(cfg, quiet=True, resume=True)
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5]
    assert completed_run(cfg) == run


def test_accumulation_equals_the_larger_batch(tmp_path, tiny_llama):
    data = pt_data(tmp_path)
    big = run_training(config(tmp_path, tiny_llama, data, "big", **{"optim.batch_size": 4}), quiet=True)
    acc = run_training(config(tmp_path, tiny_llama, data, "acc", **{"optim.grad_accumulation": 2}), quiet=True)
    np.testing.assert_allclose(losses(acc), losses(big), rtol=1e-5)
    assert "effective batch 4" in (acc / "run.yaml").read_text()


def test_finished_run_is_detected_without_training_again(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=2)
    run = run_training(cfg, quiet=True)
    stamp = (run / "adapters.safetensors").stat().st_mtime_ns
    assert completed_run(cfg) == run
    assert run_training(cfg, quiet=True, on_step=lambda *a: pytest.fail("trained again")) == run
    assert (run / "adapters.safetensors").stat().st_mtime_ns == stamp
    changed = config(tmp_path, tiny_llama, pt_data(tmp_path, docs=13), iters=2)  # new data content
    assert completed_run(changed) is None


def test_sft_stacked_on_pt_applies_both_deltas(tmp_path, tiny_qwen2):
    from mlx_med.adapters.lora import apply_frozen_adapter, apply_lora
    from mlx_med.models import load_model

    pt = run_training(config(tmp_path, tiny_qwen2, pt_data(tmp_path), "pt", iters=3), quiet=True)
    sft_cfg = config(tmp_path, tiny_qwen2, sft_data(tmp_path), "sft", phase="sft", iters=3, max_seq_len=64,
                     on_top_of=str(pt), **{"lora.rank": 4, "lora.target_modules": ["q_proj", "v_proj"]})
    sft = run_training(sft_cfg, quiet=True)
    meta = read_adapter(sft).meta
    assert meta.phase == "sft" and meta.stacked_on["path"] == str(pt) and meta.stacked_on["phase"] == "pt"
    assert meta.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]

    stacked = load_model(tiny_qwen2).model
    apply_frozen_adapter(stacked, pt)
    apply_lora(stacked, sft_cfg.lora)
    stacked.load_weights(list(read_adapter(sft).weights.items()), strict=False)
    fused = load_model(tiny_qwen2).model
    for adapter in (read_adapter(pt), read_adapter(sft)):
        for module in adapter.modules():
            layer = fused
            for part in module.split("."):
                layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
            layer.weight = layer.weight + adapter.delta(module)
    tokens = mx.array([[1, 60, 70, 80, 90, 2]])
    np.testing.assert_allclose(np.array(stacked(tokens)), np.array(fused(tokens)), atol=2e-4)


def test_sft_trains_and_counts_only_assistant_tokens(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from mlx_med.data.sft import encode_chat

    cfg = config(tmp_path, tiny_llama, sft_data(tmp_path), phase="sft", iters=4, max_seq_len=64,
                 **{"data.val_ratio": 0.25, "optim.batch_size": 3})
    run = run_training(cfg, quiet=True)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    per_chat = [int(encode_chat(m, tok).targets[1:].sum()) for m in CHATS]
    tokens = [r["tokens"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    steps = np.diff([0, *tokens])
    assert all(min(per_chat) * 3 <= s <= max(per_chat) * 3 for s in steps)  # 3 chats' answers per step
    assert all(np.isfinite(losses(run))) and losses(run, "val_loss")


def test_early_stopping(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=20, **{
        "eval.every": 2, "eval.early_stopping_patience": 2, "eval.early_stopping_min_delta": 100.0})
    run = run_training(cfg, quiet=True)
    done = json.loads((run / "done.json").read_text())
    assert done["stopped_early"] and done["steps"] == 6


def test_bad_inputs_are_clear_errors(tmp_path, tiny_llama):
    chats = sft_data(tmp_path)
    with pytest.raises(DataError, match=r"sft.jsonl:1: .*PT data needs raw text"):
        run_training(config(tmp_path, tiny_llama, chats), quiet=True)
    assert not (tmp_path / "run").exists()  # nothing half-written
    with pytest.raises(UserError, match="model folder not found"):
        run_training(config(tmp_path, tmp_path / "nope", chats), quiet=True)
    with pytest.raises(ConfigError, match="no linear layer named 'qkv'"):
        run_training(config(tmp_path, tiny_llama, pt_data(tmp_path), **{"lora.target_modules": ["qkv"]}), quiet=True)
    with pytest.raises(ConfigError, match="requested 5 layers but the model only has 2"):
        run_training(config(tmp_path, tiny_llama, pt_data(tmp_path), **{"lora.num_layers": 5}), quiet=True)
    with pytest.raises(UserError, match="do not fill one block"):
        run_training(config(tmp_path, tiny_llama, pt_data(tmp_path, docs=2), max_seq_len=500,
                            **{"data.val_ratio": 0.0}), quiet=True)


@pytest.mark.parametrize("recipe", ["demo-pt", "demo-sft", "qwen2.5-14b-pt", "qwen2.5-14b-sft"])
def test_shipped_recipes_load(recipe):
    cfg = load_config(TrainConfig, REPO / "configs" / f"{recipe}.yaml")
    assert cfg.phase in ("pt", "sft") and cfg.iters > 0


def test_lora_scale_targets_and_trainable_count(tiny_llama):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_med.adapters.lora import apply_lora
    from mlx_med.models import load_model
    from mlx_med.train.config import LoraConfig

    model = load_model(tiny_llama).model
    plan = apply_lora(model, LoraConfig(rank=4, alpha=8, use_rslora=True, num_layers=1,
                                        target_modules=["q_proj", "mlp.down_proj"]))
    assert plan.scale == 4.0 and plan.keys == ["self_attn.q_proj", "mlp.down_proj"] and plan.num_layers == 1
    loras = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(n for n, _ in loras) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sum(v.size for v in trainable.values()) == 4 * (64 + 64) + 4 * (128 + 64)
    assert all(float(mx.abs(m.lora_b).max()) == 0 for _, m in loras)  # B = 0: the base is unchanged at init


# ---------------------------------------------------------------- never lose a user's data


def test_a_loss_that_turns_nan_stops_keeps_the_last_good_checkpoint_and_writes_no_done(tmp_path, tiny_llama):
    from mlx_med.errors import TrainingDiverged
    from mlx_med.train.step import masked_loss

    calls = []

    def poisoned_at_step_4(model, inputs, targets, mask):  # the injectable loss: NaN from the 4th step on
        calls.extend([1] if model.training else [])  # validation passes do not count
        loss, count = masked_loss(model, inputs, targets, mask)
        return (loss * float("nan") if len(calls) >= 4 else loss), count

    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=8, phase="sft", **{
        "checkpoint.every": 1, "checkpoint.keep": 1, "eval.every": 0, "data.train": str(sft_data(tmp_path))})
    with pytest.raises(TrainingDiverged, match="diverged at step 4: the loss is nan"):
        run_training(cfg, quiet=True, loss=poisoned_at_step_4)
    run = Path(cfg.output)
    assert not (run / "done.json").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000003"]
    weights = mx.load(str(run / "checkpoints" / "step-0000003" / "adapters.safetensors"))
    assert all(mx.all(mx.isfinite(w)).item() for w in weights.values())
    assert all(mx.all(mx.isfinite(w)).item() for w in read_adapter(run).weights.values())


def test_an_exploding_learning_rate_is_caught(tmp_path, tiny_llama):
    from mlx_med.errors import TrainingDiverged

    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=30, **{
        "optim.learning_rate": 1e30, "optim.grad_clip": None, "checkpoint.every": 1, "eval.every": 0})
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        run_training(cfg, quiet=True)
    assert not (Path(cfg.output) / "done.json").exists()


def test_a_second_trainer_on_the_same_folder_is_refused_and_the_first_finishes(tmp_path, tiny_llama):
    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=4)
    refused = []

    def second_trainer(step, record):
        if step == 2:
            with pytest.raises(UserError, match=rf"run is in use by pid {os.getpid()}\b"):
                run_training(cfg, quiet=True, force=True)
            refused.append(step)

    run = run_training(cfg, quiet=True, on_step=second_trainer)
    assert refused == [2]
    assert completed_run(cfg) == run
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, tiny_llama, capsys):
    cfg = config(tmp_path, tiny_llama, pt_data(tmp_path), iters=6, **{"checkpoint.every": 2, "checkpoint.keep": 3})

    def stop_at_5(step, record):
        if step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_training(cfg, quiet=True, on_step=stop_at_5)
    run = Path(cfg.output)
    newest = run / "checkpoints" / "step-0000004" / "adapters.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a torn write
    (run / "checkpoints" / ".step-0000006.999999999.x.partial").mkdir()  # left by a killed process
    run_training(cfg, resume=True)
    err = capsys.readouterr().err
    assert "skipping checkpoint step-0000004" in err and "resuming" in err and "from step 2 (step-0000002)" in err
    assert completed_run(cfg) == run
    assert not (run / "checkpoints" / ".step-0000006.999999999.x.partial").exists()


def test_sigterm_mid_training_leaves_a_resumable_checkpoint(tmp_path, tiny_llama):
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "mlx_med.cli", "train", "--model", str(tiny_llama), "--data",
            str(pt_data(tmp_path)), "-o", str(run), "--iters", "100000", "--max-seq-len", "32", "--batch-size", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM" in err and "Traceback" not in err
    checkpoints = list((run / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "optimizer.safetensors").is_file()
    assert not (run / "done.json").exists()
    step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    cfg = load_config(TrainConfig, run / "run.yaml", {"iters": step + 1, "output": str(run)})
    run_training(cfg, quiet=True, resume=True)
    assert json.loads((run / "done.json").read_text())["steps"] == step + 1


def test_train_cli_refuses_dangerous_outputs_before_loading_and_loses_nothing(tmp_path, tiny_llama, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from mlx_med.cli import cli

    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    data = pt_data(work)
    (work / "notes.txt").write_text("keep me")
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years")
    home = tmp_path / "home"
    home.mkdir()
    (home / "diary.txt").write_text("private")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for target in (".", "~", str(work), "foreign", str(home)):
        for force in ([], ["--force"]):
            result = CliRunner().invoke(cli, ["train", "--model", "model", "--data", str(data), "-o", target,
                                              "--iters", "1", *force])
            assert result.exit_code == 2, (target, force, result.output)
            assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
