"""Data-parallel training under ``mlx.launch`` (ring backend, 2 processes on loopback)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_med.config import dump_config, load_config
from mlx_med.train.config import TrainConfig
from mlx_med.train.trainer import run_training

HERE = Path(__file__).parent
TEXT = "Hypertension is treated with lifestyle changes and antihypertensive drugs. "
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
    ("Is aspirin indicated after a stroke?", "Yes, for secondary prevention."),
    ("高血压患者应该注意什么？", "低盐饮食，规律服用降压药。"),
    ("Fever and cough for three days?", "See a doctor if breathing becomes difficult."),
    ("Maximum paracetamol dose?", "Do not exceed the maximum daily dose."),
    ("What is diabetes?", "A disease of high blood glucose that needs regular monitoring."),
]] * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def settings(tmp_path: Path, model: Path, phase: str) -> dict:
    data = tmp_path / f"{phase}.jsonl"
    rows = [{"text": TEXT * (1 + i % 3)} for i in range(10)] if phase == "pt" else [{"messages": m} for m in CHATS]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"phase": phase, "model": str(model), "data.train": str(data), "iters": 4,
            "max_seq_len": 32 if phase == "pt" else 64, "log_every": 1, "eval.every": 2,
            "optim.learning_rate": 5e-3, "checkpoint.every": 2, "data.val_ratio": 0.2}


@pytest.mark.slow
def test_two_ring_processes_match_one_process_with_the_global_batch(tmp_path, tiny_llama):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch not installed next to this python")
    watch = tmp_path / "dist"
    watch.mkdir()
    reports = tmp_path / "reports"
    reports.mkdir()
    singles, configs = {}, []
    for phase in ("pt", "sft"):
        common = settings(tmp_path, tiny_llama, phase)
        singles[phase] = run_training(load_config(TrainConfig, None, {
            **common, "optim.batch_size": 4, "output": str(tmp_path / f"single-{phase}"),
            "data.cache_dir": str(tmp_path / "cache-single")}), quiet=True)
        cfg = load_config(TrainConfig, None, {**common, "optim.batch_size": 2, "output": str(watch / phase),
                                              "data.cache_dir": str(watch / "cache")})
        configs.append(tmp_path / f"dist-{phase}.yaml")
        configs[-1].write_text(dump_config(cfg))

    # One thread per process: two ranks share this machine's cores.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--starting-port", str(free_port()),
                           "--python", sys.executable, "--", str(HERE / "distributed_worker.py"), str(watch),
                           str(reports), *map(str, configs)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(HERE.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    writes = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in reports.glob("writes-*.json")}
    assert set(writes) == {0, 1}, proc.stdout + proc.stderr
    assert writes[1] == [], writes[1]  # rank 1 never writes
    assert any(p.endswith("metrics.jsonl") for p in writes[0]) and any("checkpoints" in p for p in writes[0])
    assert any("cache" in p for p in writes[0])  # the PT token cache, written by rank 0 only

    for phase, single in singles.items():
        dist, one = records(watch / phase), records(single)
        assert [r["step"] for r in dist] == [1, 2, 3, 4]
        np.testing.assert_allclose([r["train_loss"] for r in dist], [r["train_loss"] for r in one], rtol=1e-4)
        np.testing.assert_allclose([r["val_loss"] for r in dist if "val_loss" in r],
                                   [r["val_loss"] for r in one if "val_loss" in r], rtol=1e-4)
        assert [r["tokens"] for r in dist] == [r["tokens"] for r in one]
        text = (watch / phase / "run.yaml").read_text()
        assert "effective batch 4 sequences per step = 2 per process x 2 process(es) x 1 accumulation" in text
        assert json.loads((watch / phase / "done.json").read_text())["world_size"] == 2
