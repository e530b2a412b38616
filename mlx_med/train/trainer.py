"""Run one training phase (PT or SFT) into a run directory: ``run_training(cfg) -> run_dir``.

The run directory is an adapter directory (``mlx_med.adapters.format``) plus ``run.yaml`` (the
resolved config), ``metrics.jsonl``, ``loss_curve.png``, ``checkpoints/`` and, when the phase has
finished, ``done.json``. ``done.json`` records a key over the config and the fingerprints of model
and data; calling ``run_training`` again with the same inputs returns at once.

Works unchanged under ``mlx.launch``: every process trains on its share of each global batch,
gradients are averaged with ``mlx.nn.average_gradients``, and only rank 0 writes files.
Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises ``KeyboardInterrupt``;
resume with ``resume=True`` (CLI: ``--resume RUN_DIR``) at the same world size, from the newest
checkpoint that reads back whole. A NaN/inf loss or gradient stops the run (``TrainingDiverged``)
before that step is saved.

Three parts: ``setup_run`` (model, data, optimizer, resume), ``loop.train`` (the steps; loss and batch
iterator are arguments) and ``finish_run`` (final checkpoint, ``done.json``). ``run_training`` holds
the run folder's lock (``mlx_med.io.output_lock``) around all three.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_med.adapters.format import Adapter, AdapterMeta, runtime_versions, write_adapter
from mlx_med.backend import seed_everything
from mlx_med.config import dump_config
from mlx_med.data.batches import BatchSchedule
from mlx_med.errors import UserError
from mlx_med.fingerprint import model_fingerprint
from mlx_med.io import (
    atomic_write_json,
    atomic_write_text,
    mark_dir,
    output_lock,
)
from mlx_med.train.checkpoints import CheckpointUnreadable, list_checkpoints, load_checkpoint, save_checkpoint
from mlx_med.train.config import TrainConfig
from mlx_med.train.datasets import build_phase_data
from mlx_med.train.loop import LoopHooks, LoopResult, LoopState, perplexity, schedule_batches, train
from mlx_med.train.plots import METRICS_FILE, plot_loss_curve, read_metrics
from mlx_med.train.run_dir import (
    DONE_FILE,
    RUN_CONFIG,
    adapter_fingerprint,
    check_run_dir,
    clean_run_leftovers,
    clear_run_dir,
    completed_run,
    inputs_key,
    load_run_config,
    truncate_metrics,
)

__all__ = ["TrainingRun", "completed_run", "finish_run", "load_run_config", "run_training", "setup_run"]


@dataclass
class TrainingRun:
    """Everything ``setup_run`` prepared: the loop and ``finish_run`` work from this."""

    cfg: TrainConfig
    out: Path
    world: Any
    model: Any
    optimizer: Any
    runner: Any
    data: Any
    schedule: BatchSchedule
    plan: Any
    base_fp: str
    stacked_on: dict | None
    state: LoopState
    say: Callable[[str], None]

    @property
    def rank(self) -> int:
        return self.world.rank()

    @property
    def size(self) -> int:
        return self.world.size()

    @property
    def accum(self) -> int:
        return self.cfg.optim.grad_accumulation


def run_training(cfg: TrainConfig, quiet: bool = False, *, json_log: bool = False, resume: bool = False,
                 force: bool = False, on_step: Callable[[int, dict], None] | None = None,
                 loss: Callable | None = None, iterate_batches: Callable | None = None) -> Path:
    """Train one phase and return its run directory.

    Args:
        cfg: the resolved configuration (``cfg.check()`` is applied).
        quiet: no progress bar and no log lines (errors still raise).
        json_log: print each metrics record as one JSON line on stdout (implies no progress bar).
        resume: continue the run in ``cfg.output`` from its newest valid checkpoint.
        force: replace an existing run directory (only one mlx-med wrote) and start over.
        on_step: called after every optimizer step with (step, metrics record or {}).
        loss: ``loss(model, *arrays) -> (summed loss, token count)``; default: masked cross-entropy
            (SFT: scored only at the completion's positions).
        iterate_batches: ``(first_step, last_step) -> iterator of [micro-batch, ...]`` per step;
            default: the seeded, resumable schedule over ``cfg.data``.

    Raises:
        UserError: bad config, data or model; an existing run dir without ``resume``/``force``; a
            run dir in use by another process.
        TrainingDiverged: NaN/inf loss or gradient (no ``done.json``; the last good checkpoint stays).
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once the checkpoint of the last finished step is written.
    """
    cfg.check()
    world = mx.distributed.init()
    out = Path(cfg.output)
    say = _printer(world.rank() == 0 and not quiet)
    if not _admit(cfg, world, resume, force):
        say(f"{out}: already trained with these inputs (done.json); nothing to do")
        return out
    with contextlib.ExitStack() as held:
        if world.rank() == 0:  # one writer per run folder for the whole run
            held.enter_context(output_lock(out))
            clean_run_leftovers(out)
        run = setup_run(cfg, world, say, resume=resume, force=force, loss=loss)
        batches = iterate_batches or schedule_batches(run.schedule, run.accum)
        bar = _progress(cfg.iters, run.state.step, enabled=run.rank == 0 and not quiet and not json_log)
        try:
            result = train(run.runner, run.state, cfg, _hooks(run, json_log, on_step), batches, world=world,
                           rank=run.rank, record=lambda state, step: _record(state, step, run), bar=bar,
                           has_valid=run.data.valid is not None)
        finally:
            bar.close()
        return finish_run(run, result)


def setup_run(cfg: TrainConfig, world, say: Callable[[str], None], *, resume: bool = False, force: bool = False,
              loss: Callable | None = None) -> TrainingRun:
    """Load model and data, apply LoRA, build the optimizer, and restore the newest valid checkpoint."""
    rank, size = world.rank(), world.size()
    out = Path(cfg.output)
    seed_everything(cfg.seed)
    from mlx_med.adapters.lora import apply_frozen_adapter, apply_lora
    from mlx_med.models import load_model
    from mlx_med.train.step import StepRunner, build_optimizer, checkpoint_blocks, split_head

    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    base_fp = model_fingerprint(cfg.model)
    stacked_on = None
    if cfg.on_top_of is not None:
        pt = apply_frozen_adapter(model, Path(cfg.on_top_of))
        if pt.meta.base_fingerprint and pt.meta.base_fingerprint != base_fp:
            raise UserError(f"--on-top-of {cfg.on_top_of} was trained on another base "
                            f"({pt.meta.base_model}, fingerprint {pt.meta.base_fingerprint}; this base is {base_fp})")
        stacked_on = {"path": str(cfg.on_top_of), "fingerprint": adapter_fingerprint(cfg.on_top_of),
                      "phase": pt.meta.phase}
    plan = apply_lora(model, cfg.lora)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    data = build_phase_data(cfg, tokenizer, write_cache=rank == 0)
    schedule = BatchSchedule(data.train, cfg.optim.batch_size, rank, size)
    optimizer = build_optimizer(cfg)
    head_split = split_head(model) if cfg.phase == "sft" and loss is None else None
    runner = StepRunner(model, optimizer, cfg.optim.grad_clip, head_split, world, compile=cfg.phase == "pt",
                        loss=loss)
    accum = cfg.optim.grad_accumulation
    effective = cfg.optim.batch_size * size * accum

    # Everything that can fail on bad input has run: only now is an old run replaced (--force).
    if force and not resume and rank == 0:
        clear_run_dir(out)
    state = LoopState()
    restored = _restore_newest_valid(out, model, optimizer, size, say) if resume else None
    if restored is not None:
        state, used = restored
        if rank == 0:
            truncate_metrics(out, state.step)
        say(f"resuming {out} from step {state.step} ({used.name})")
    else:
        if resume:
            say(f"{out}: no valid checkpoint; starting from step 0")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / METRICS_FILE).write_text("")
    if rank == 0:
        mark_dir(out)
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
        f"process(es) x {accum} accumulation); {len(schedule.batches_in_epoch(0))} steps per epoch")
    run = TrainingRun(cfg, out, world, model, optimizer, runner, data, schedule, plan, base_fp, stacked_on, state, say)
    if state.step == 0 and data.valid is not None and cfg.eval.every >= 0:
        model.train()
        state.initial_val_loss = _validate(run)
        say(f"step 0: validation loss {state.initial_val_loss:.4f}")
    model.train()
    return run


def finish_run(run: TrainingRun, result: LoopResult) -> Path:
    """Final checkpoint, loss curve and (unless interrupted) ``done.json``."""
    cfg, out, state = run.cfg, run.out, run.state
    _save(run, state.step)
    if run.rank == 0:
        plot_loss_curve(out)
    if result.interrupted:
        run.say(f"interrupted: checkpoint saved at step {state.step}; continue with: mlx-med train --resume {out}")
        raise KeyboardInterrupt
    if run.rank == 0:
        records = read_metrics(out)
        last = next((r for r in reversed(records) if "train_loss" in r), {})
        last_val = next((r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None), None)
        atomic_write_json(out / DONE_FILE, {
            "inputs_key": inputs_key(cfg, run.size), "world_size": run.size, "phase": cfg.phase, "steps": state.step,
            "iters": cfg.iters, "stopped_early": result.stopped_early, "final_train_loss": last.get("train_loss"),
            "final_val_loss": last_val, "initial_val_loss": state.initial_val_loss,
            "tokens_seen": state.tokens_seen, "train_seconds": round(state.train_seconds, 2),
            "effective_batch": cfg.optim.batch_size * run.size * run.accum})
    run.say(f"done: {out}")
    return out


def _admit(cfg: TrainConfig, world, resume: bool, force: bool) -> bool:
    """False when the run is already finished; raise when it may not start. All processes agree."""
    # Every process decides from the same files, then they agree before rank 0 writes anything: otherwise a
    # fast rank 0 could create the run dir that a slower rank then finds "already exists".
    verdict, problem = _GO, None
    if completed_run(cfg) is not None and not force:
        verdict = _DONE
    else:
        try:
            check_run_dir(Path(cfg.output), cfg, resume, force)
        except UserError as err:
            verdict, problem = _REFUSED, err
    verdict = _agree(world, verdict)
    if verdict == _REFUSED:
        raise problem or UserError(f"{cfg.output}: another process of this run refused to start (see rank 0's message)")
    return verdict != _DONE


def _hooks(run: TrainingRun, json_log: bool, on_step) -> LoopHooks:
    def emit(record: dict) -> None:
        if run.rank == 0:
            with open(run.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if json_log:
                print(json.dumps(record), flush=True)

    return LoopHooks(validate=lambda: _validate(run), save=lambda step: _save(run, step), emit=emit, say=run.say,
                     on_step=on_step)


def _validate(run: TrainingRun) -> float | None:
    from mlx_med.train.step import evaluate_loss

    data, cfg = run.data, run.cfg
    if data.valid is None:
        return None
    run.model.eval()
    batches = data.valid.eval_batches(cfg.eval.batch_size or cfg.optim.batch_size)
    if cfg.eval.max_batches > 0:
        batches = batches[: cfg.eval.max_batches]
    mine = (run.runner.arrays(data.valid.collate(ids)) for ids in batches[run.rank::run.size])
    loss, _ = evaluate_loss(run.model, mine, run.runner.validation_loss, run.world)
    run.model.train()
    return loss


def _save(run: TrainingRun, step: int) -> None:
    if run.rank == 0:
        save_checkpoint(run.out, step, run.model, run.optimizer, _state_json(run), run.cfg.checkpoint.keep)
        _write_adapter(run)


_GO, _DONE, _REFUSED = 0, 1, 2


def _agree(world, verdict: int) -> int:
    """The most severe verdict of all processes (also a barrier between them)."""
    if world.size() == 1:
        return verdict
    return int(mx.distributed.all_max(mx.array(verdict), group=world, stream=mx.cpu).item())


def _record(state: LoopState, step: int, run: TrainingRun) -> dict[str, Any]:
    """One metrics line from the window since the last logged step (which it then resets)."""
    w = state.window
    loss = w["loss_sum"] / max(1, w["tokens"])
    record = {
        "step": step,
        "epoch": round(step * run.accum / len(run.schedule.batches_in_epoch(0)), 4),
        "train_loss": loss,
        "train_ppl": perplexity(loss),
        "learning_rate": run.optimizer.learning_rate.item(),
        "tokens_per_sec": round(w["tokens"] / w["seconds"], 2) if w["seconds"] else None,  # loss tokens
        "input_tokens_per_sec": round(w["inputs"] / w["seconds"], 2) if w["seconds"] else None,  # + prompts
        "tokens": state.tokens_seen,
        "grad_norm": w["grad_norm"] / max(1, w["steps"]),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "elapsed_s": round(state.train_seconds, 4),
    }
    state.window = LoopState().window
    return record


def _state_json(run: TrainingRun) -> dict[str, Any]:
    state = run.state
    epoch, index = run.schedule.position(state.step * run.accum)
    return {"tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
            "best_val": None if math.isinf(state.best_val) else state.best_val, "bad_evals": state.bad_evals,
            "initial_val_loss": state.initial_val_loss, "window": state.window, "world_size": run.size,
            "data_position": {"micro_batches": state.step * run.accum, "epoch": epoch, "batch_in_epoch": index}}


def _restore_newest_valid(out: Path, model, optimizer, world: int, say) -> tuple[LoopState, Path] | None:
    """Restore the newest checkpoint that reads back whole; say which ones were skipped and why."""
    for path in reversed(list_checkpoints(out)):
        try:
            saved = load_checkpoint(path, model, optimizer)
        except CheckpointUnreadable as err:
            say(f"skipping checkpoint {path.name}: {err}")
            continue
        if saved.get("world_size", 1) != world:
            raise UserError(f"{path}: saved with {saved.get('world_size')} process(es); resume with the same "
                            f"number (this run has {world}) so the data order stays the same")
        best = saved.get("best_val")
        state = LoopState(step=saved["step"], tokens_seen=saved["tokens_seen"], train_seconds=saved["train_seconds"],
                          best_val=math.inf if best is None else best, bad_evals=saved["bad_evals"],
                          initial_val_loss=saved.get("initial_val_loss"),
                          window={**LoopState().window, **saved["window"]})
        return state, path
    return None


def _write_adapter(run: TrainingRun) -> None:
    cfg, plan = run.cfg, run.plan
    weights = dict(tree_flatten(run.model.trainable_parameters()))
    meta = AdapterMeta(phase=cfg.phase, base_model=str(cfg.model), base_fingerprint=run.base_fp,
                       lora_alpha=cfg.lora.alpha, use_rslora=cfg.lora.use_rslora, target_modules=plan.keys,
                       stacked_on=run.stacked_on, data=run.data.fingerprints, versions=runtime_versions(),
                       extra={"max_seq_len": cfg.max_seq_len, "iters": cfg.iters})
    write_adapter(Adapter(rank=plan.rank, scale=plan.scale, num_layers=plan.num_layers, keys=plan.keys,
                          weights=weights, meta=meta, dropout=plan.dropout), run.out)


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return say


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, desc="train")
