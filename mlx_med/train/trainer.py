"""Run one training phase (PT or SFT) into a run directory: ``run_training(cfg) -> run_dir``.

The run directory is an adapter directory (``mlx_med.adapters.format``) plus ``run.yaml`` (the
resolved config), ``metrics.jsonl``, ``loss_curve.png``, ``checkpoints/`` and, when the phase has
finished, ``done.json``. ``done.json`` records a key over the config and the fingerprints of model
and data; calling ``run_training`` again with the same inputs returns at once.

Works unchanged under ``mlx.launch``: every process trains on its share of each global batch,
gradients are averaged with ``mlx.nn.average_gradients``, and only rank 0 writes files.
Ctrl-C finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt``; resume with
``resume=True`` (CLI: ``--resume RUN_DIR``) at the same world size.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_med.adapters.format import Adapter, AdapterMeta, runtime_versions, write_adapter
from mlx_med.backend import seed_everything
from mlx_med.config import config_to_dict, dump_config, load_config
from mlx_med.data.batches import BatchSchedule
from mlx_med.errors import UserError
from mlx_med.fingerprint import file_fingerprint, model_fingerprint
from mlx_med.io import atomic_write_json, atomic_write_text
from mlx_med.train.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from mlx_med.train.config import TrainConfig
from mlx_med.train.datasets import build_phase_data, data_fingerprint
from mlx_med.train.plots import METRICS_FILE, plot_loss_curve, read_metrics

DONE_FILE = "done.json"
RUN_CONFIG = "run.yaml"
# Settings that may change between a run and its resumption (they do not change the math so far).
RESUMABLE_CHANGES = {"output", "iters", "log_every", "eval.every", "eval.max_batches", "eval.batch_size",
                     "eval.early_stopping_patience", "eval.early_stopping_min_delta", "checkpoint.every",
                     "checkpoint.keep"}


@dataclass
class LoopState:
    """Counters that a checkpoint must carry for a resumed run to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val: float = math.inf
    bad_evals: int = 0
    initial_val_loss: float | None = None
    window: dict[str, float] = field(default_factory=lambda: {"loss_sum": 0.0, "tokens": 0, "inputs": 0,
                                                               "seconds": 0.0, "steps": 0, "grad_norm": 0.0})


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The ``run.yaml`` a run was started with (plus flag overrides), e.g. to resume it."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RUN_CONFIG}; is this a training run directory?")
    return load_config(TrainConfig, path, {**(overrides or {}), "output": str(run_dir)})


def completed_run(cfg: TrainConfig) -> Path | None:
    """The run directory if it holds a finished run of exactly these inputs, else None (cheap)."""
    out = Path(cfg.output) if cfg.output else None
    if out is None or not (out / DONE_FILE).is_file():
        return None
    try:
        done = json.loads((out / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return out if done.get("inputs_key") == inputs_key(cfg, done.get("world_size", 1)) else None


def inputs_key(cfg: TrainConfig, world_size: int) -> str:
    """Hash of everything that determines the trained adapter: config, model, data, world size."""
    parts = {k: v for k, v in config_to_dict(cfg).items() if k != "output"}
    prints = {"model": model_fingerprint(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None,
              "train": _maybe(data_fingerprint, cfg.data.train), "valid": _maybe(data_fingerprint, cfg.data.valid),
              "on_top_of": _adapter_fingerprint(cfg.on_top_of) if cfg.on_top_of else None}
    blob = json.dumps({"config": parts, "inputs": prints, "world": world_size}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_training(cfg: TrainConfig, quiet: bool = False, *, json_log: bool = False, resume: bool = False,
                 force: bool = False, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train one phase and return its run directory.

    Args:
        cfg: the resolved configuration (``cfg.check()`` is applied).
        quiet: no progress bar and no log lines (errors still raise).
        json_log: print each metrics record as one JSON line on stdout (implies no progress bar).
        resume: continue the run in ``cfg.output`` from its newest checkpoint.
        force: delete an existing ``cfg.output`` and start over.
        on_step: called after every optimizer step with (step, metrics record or {}).

    Raises:
        UserError: bad config, data or model; an existing run dir without ``resume``/``force``.
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the last finished step is written.
    """
    cfg.check()
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    out = Path(cfg.output)
    say = _printer(rank == 0 and not quiet)
    # Every process decides from the same files, then they agree before rank 0 writes anything: otherwise a
    # fast rank 0 could create the run dir that a slower rank then finds "already exists".
    verdict, problem = _GO, None
    if completed_run(cfg) is not None and not force:
        verdict = _DONE
    else:
        try:
            _preflight(out, cfg, resume, force)
        except UserError as err:
            verdict, problem = _REFUSED, err
    verdict = _agree(world, verdict)
    if verdict == _DONE:
        say(f"{out}: already trained with these inputs (done.json); nothing to do")
        return out
    if verdict == _REFUSED:
        raise problem or UserError(f"{out}: another process of this run refused to start (see rank 0's message)")
    checkpoints = list_checkpoints(out) if resume else []
    if force and not resume and out.exists() and rank == 0:
        shutil.rmtree(out)

    seed_everything(cfg.seed)
    from mlx_med.adapters.lora import apply_frozen_adapter, apply_lora
    from mlx_med.models import load_model
    from mlx_med.train.step import StepRunner, build_optimizer, checkpoint_blocks, evaluate_loss, split_head

    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    base_fp = model_fingerprint(cfg.model)
    stacked_on = None
    if cfg.on_top_of is not None:
        pt = apply_frozen_adapter(model, Path(cfg.on_top_of))
        if pt.meta.base_fingerprint and pt.meta.base_fingerprint != base_fp:
            raise UserError(f"--on-top-of {cfg.on_top_of} was trained on another base "
                            f"({pt.meta.base_model}, fingerprint {pt.meta.base_fingerprint}; this base is {base_fp})")
        stacked_on = {"path": str(cfg.on_top_of), "fingerprint": _adapter_fingerprint(cfg.on_top_of),
                      "phase": pt.meta.phase}
    plan = apply_lora(model, cfg.lora)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    data = build_phase_data(cfg, tokenizer, write_cache=rank == 0)
    schedule = BatchSchedule(data.train, cfg.optim.batch_size, rank, size)
    optimizer = build_optimizer(cfg)
    head_split = split_head(model) if cfg.phase == "sft" else None
    runner = StepRunner(model, optimizer, cfg.optim.grad_clip, head_split, world, compile=cfg.phase == "pt")
    accum = cfg.optim.grad_accumulation
    per_epoch = len(schedule.batches_in_epoch(0))
    effective = cfg.optim.batch_size * size * accum

    state = LoopState()
    if checkpoints:
        state = _restore(checkpoints[-1], model, optimizer, size)
        if rank == 0:
            _truncate_metrics(out, state.step)
        say(f"resuming {out} from step {state.step} ({checkpoints[-1].name})")
    else:
        if resume:
            say(f"{out}: no checkpoint yet; starting from step 0")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / METRICS_FILE).write_text("")
    if rank == 0:
        (out / DONE_FILE).unlink(missing_ok=True)
        header = (f"# mlx-med train, phase {cfg.phase}: effective batch {effective} sequences per step = "
                  f"{cfg.optim.batch_size} per process x {size} process(es) x {accum} accumulation\n"
                  f"# compute: {loaded.backend.describe()}\n")
        atomic_write_text(out / RUN_CONFIG, header + dump_config(cfg))
    for note in data.notes:
        say(note)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"LoRA rank {plan.rank}, scale {plan.scale:g}, {len(plan.keys)} module(s) x {plan.num_layers} layer(s): "
        f"{trainable / 1e6:.3f}M trainable parameters" + (f"; stacked on {cfg.on_top_of}" if stacked_on else ""))
    say(f"effective batch: {effective} sequences/step ({cfg.optim.batch_size} per process x {size} "
        f"process(es) x {accum} accumulation); {per_epoch} steps per epoch")

    def validate() -> float | None:
        if data.valid is None:
            return None
        model.eval()
        eval_bs = cfg.eval.batch_size or cfg.optim.batch_size
        batches = data.valid.eval_batches(eval_bs)
        if cfg.eval.max_batches > 0:
            batches = batches[: cfg.eval.max_batches]
        mine = (runner.arrays(data.valid.collate(ids)) for ids in batches[rank::size])
        loss, _ = evaluate_loss(model, mine, runner.loss, world)
        model.train()
        return loss

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(out, step, model, optimizer, _state_json(state, schedule, accum, size), cfg.checkpoint.keep)
            _write_adapter(out, cfg, plan, model, base_fp, stacked_on, data.fingerprints)

    def emit(record: dict) -> None:
        if rank == 0:
            with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if json_log:
                print(json.dumps(record), flush=True)

    stop = _StopFlag(world)
    model.train()
    if state.step == 0 and data.valid is not None and cfg.eval.every >= 0:
        state.initial_val_loss = validate()
        say(f"step 0: validation loss {state.initial_val_loss:.4f}")
    bar = _progress(cfg.iters, state.step, enabled=rank == 0 and not quiet and not json_log)
    stopped_early = False
    try:
        with stop:
            for step in range(state.step + 1, cfg.iters + 1):
                start = time.perf_counter()
                for micro in range(accum):
                    k = (step - 1) * accum + micro
                    mx.random.seed((cfg.seed * 1_000_003 + k) * 131 + rank)  # dropout, reproducible on resume
                    runner.accumulate(schedule.micro_batch(k), last=micro == accum - 1)
                loss, tokens, inputs, grad_norm = runner.update()
                seconds = time.perf_counter() - start
                state.step, state.tokens_seen = step, state.tokens_seen + tokens
                state.train_seconds += seconds
                w = state.window
                w["loss_sum"] += loss * tokens
                w["tokens"] += tokens
                w["inputs"] += inputs
                w["seconds"] += seconds
                w["steps"] += 1
                w["grad_norm"] += grad_norm
                val_step = data.valid is not None and (step == cfg.iters or (cfg.eval.every > 0 and step % cfg.eval.every == 0))
                record = {}
                if step % cfg.log_every == 0 or step == cfg.iters or val_step:
                    record = _record(state, step, optimizer, schedule, accum)
                    if val_step:
                        val = validate()
                        record.update(val_loss=val, val_ppl=_ppl(val))
                        if val < state.best_val - cfg.eval.early_stopping_min_delta:
                            state.best_val, state.bad_evals = val, 0
                        else:
                            state.bad_evals += 1
                    emit(record)
                    bar.set_postfix_str(_postfix(record))
                bar.update(1)
                patience = cfg.eval.early_stopping_patience
                if patience and state.bad_evals >= patience:
                    stopped_early = True
                    say(f"early stopping at step {step}: no validation improvement in {patience} evaluations")
                if cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0 and step < cfg.iters:
                    save(step)
                if on_step is not None:
                    on_step(step, record)
                if stopped_early or stop.requested():
                    break
    finally:
        bar.close()
    save(state.step)
    if rank == 0:
        plot_loss_curve(out)
    if stop.requested() and not stopped_early and state.step < cfg.iters:
        say(f"interrupted: checkpoint saved at step {state.step}; continue with: mlx-med train --resume {out}")
        raise KeyboardInterrupt
    if rank == 0:
        records = read_metrics(out)
        last = next((r for r in reversed(records) if "train_loss" in r), {})
        last_val = next((r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None), None)
        atomic_write_json(out / DONE_FILE, {
            "inputs_key": inputs_key(cfg, size), "world_size": size, "phase": cfg.phase, "steps": state.step,
            "iters": cfg.iters, "stopped_early": stopped_early, "final_train_loss": last.get("train_loss"),
            "final_val_loss": last_val, "initial_val_loss": state.initial_val_loss,
            "tokens_seen": state.tokens_seen, "train_seconds": round(state.train_seconds, 2),
            "effective_batch": effective})
    say(f"done: {out}")
    return out


_GO, _DONE, _REFUSED = 0, 1, 2


def _preflight(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Raise ``UserError`` when ``out`` cannot be started, resumed or replaced as asked."""
    if out.exists() and not resume and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or --resume {out} to continue it")
    if resume and not out.is_dir():
        raise UserError(f"cannot resume: {out} does not exist")
    if resume and (out / RUN_CONFIG).is_file():
        _check_resumable(out, cfg)


def _agree(world, verdict: int) -> int:
    """The most severe verdict of all processes (also a barrier between them)."""
    if world.size() == 1:
        return verdict
    return int(mx.distributed.all_max(mx.array(verdict), group=world, stream=mx.cpu).item())


def _record(state: LoopState, step: int, optimizer, schedule: BatchSchedule, accum: int) -> dict[str, Any]:
    """One metrics line from the window since the last logged step (which it then resets)."""
    w = state.window
    loss = w["loss_sum"] / max(1, w["tokens"])
    record = {
        "step": step,
        "epoch": round(step * accum / len(schedule.batches_in_epoch(0)), 4),
        "train_loss": loss,
        "train_ppl": _ppl(loss),
        "learning_rate": optimizer.learning_rate.item(),
        "tokens_per_sec": round(w["tokens"] / w["seconds"], 2) if w["seconds"] else None,  # loss tokens
        "input_tokens_per_sec": round(w["inputs"] / w["seconds"], 2) if w["seconds"] else None,  # + prompts
        "tokens": state.tokens_seen,
        "grad_norm": w["grad_norm"] / max(1, w["steps"]),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "elapsed_s": round(state.train_seconds, 4),
    }
    state.window = LoopState().window
    return record


def _ppl(loss: float | None) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 50.0))


def _postfix(record: dict) -> str:
    parts = [f"loss {record['train_loss']:.3f}"]
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.3f}")
    if record.get("tokens_per_sec"):
        parts.append(f"{record['tokens_per_sec']:.0f} tok/s")
    parts.append(f"peak {record['peak_memory_gb']:.2f} GB")
    return ", ".join(parts)


def _state_json(state: LoopState, schedule: BatchSchedule, accum: int, world: int) -> dict[str, Any]:
    epoch, index = schedule.position(state.step * accum)
    return {"tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
            "best_val": None if math.isinf(state.best_val) else state.best_val, "bad_evals": state.bad_evals,
            "initial_val_loss": state.initial_val_loss, "window": state.window, "world_size": world,
            "data_position": {"micro_batches": state.step * accum, "epoch": epoch, "batch_in_epoch": index}}


def _restore(path: Path, model, optimizer, world: int) -> LoopState:
    saved = load_checkpoint(path, model, optimizer)
    if saved.get("world_size", 1) != world:
        raise UserError(f"{path}: saved with {saved.get('world_size')} process(es); resume with the same "
                        f"number (this run has {world}) so the data order stays the same")
    best = saved.get("best_val")
    return LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"], train_seconds=saved["train_seconds"],
                     best_val=math.inf if best is None else best, bad_evals=saved["bad_evals"],
                     initial_val_loss=saved.get("initial_val_loss"), window={**LoopState().window, **saved["window"]})


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (a killed run may have written some)."""
    path = out / METRICS_FILE
    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in read_metrics(out) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(kept))


def _write_adapter(out: Path, cfg: TrainConfig, plan, model, base_fp: str, stacked_on, fingerprints) -> None:
    weights = dict(tree_flatten(model.trainable_parameters()))
    meta = AdapterMeta(phase=cfg.phase, base_model=str(cfg.model), base_fingerprint=base_fp,
                       lora_alpha=cfg.lora.alpha, use_rslora=cfg.lora.use_rslora, target_modules=plan.keys,
                       stacked_on=stacked_on, data=fingerprints, versions=runtime_versions(),
                       extra={"max_seq_len": cfg.max_seq_len, "iters": cfg.iters})
    write_adapter(Adapter(rank=plan.rank, scale=plan.scale, num_layers=plan.num_layers, keys=plan.keys,
                          weights=weights, meta=meta, dropout=plan.dropout), out)


def _maybe(fingerprint, path) -> str | None:
    """A fingerprint, or None for a missing path (the run itself reports that error)."""
    try:
        return fingerprint(path) if path is not None else None
    except UserError:
        return None


def _adapter_fingerprint(run_dir: Path) -> str | None:
    weights = Path(run_dir) / "adapters.safetensors"
    return file_fingerprint(weights) if weights.is_file() else None


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that would make the continuation a different run."""
    saved = _flatten(config_to_dict(load_run_config(out)))
    now = _flatten(config_to_dict(cfg))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise UserError(f"cannot resume {out} with changed settings ({details}); start a new run instead")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return say


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, desc="train")


class _StopFlag:
    """Ctrl-C asks to stop after the current step (a second Ctrl-C aborts at once).

    In a distributed run every process must stop at the same step, so the flag is summed across
    processes each step.
    """

    def __init__(self, world):
        self.world, self.flag, self.previous = world, False, None
        self._agreed = False

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        if self._agreed:
            return True
        if self.world.size() > 1:
            total = mx.distributed.all_sum(mx.array(float(self.flag)), group=self.world, stream=mx.cpu)
            self._agreed = total.item() > 0
        else:
            self._agreed = self.flag
        return self._agreed
