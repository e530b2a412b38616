"""The training loop: ``train(run, loss=..., iterate_batches=...)``, in plain view.

``trainer.py`` sets a run up (model, data, optimizer, resume) and finishes it (final checkpoint,
``done.json``); this module steps it. The loss and the batch iterator are arguments, as in mlx-lm's
``train(model, ..., loss=, iterate_batches=)``, so tests and experiments can swap either.

The loop checks the loss and the gradient norm for NaN/inf at the point where it already reads them
back from the device (once per optimizer step), so the guard costs no extra synchronisation. A
non-finite value stops training before anything of that step is saved.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_med.data.batches import Batch, BatchSchedule
from mlx_med.errors import TrainingDiverged


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


@dataclass
class LoopHooks:
    """What the loop calls out to; the trainer supplies them (rank 0 writes, the others do not)."""

    validate: Callable[[], float | None]  # validation loss, or None without a validation split
    save: Callable[[int], None]  # write checkpoint + adapter for this step
    emit: Callable[[dict], None]  # one metrics record
    say: Callable[[str], None]  # a log line
    on_step: Callable[[int, dict], None] | None = None


@dataclass
class LoopResult:
    stopped_early: bool = False
    interrupted: bool = False


def schedule_batches(schedule: BatchSchedule, accum: int) -> Callable[[int, int], Iterator[list[Batch]]]:
    """The default batch iterator: for steps ``first..last``, the step's ``accum`` micro-batches."""

    def iterate(first: int, last: int) -> Iterator[list[Batch]]:
        for step in range(first, last + 1):
            yield [schedule.micro_batch((step - 1) * accum + micro) for micro in range(accum)]

    return iterate


def train(runner, state: LoopState, cfg, hooks: LoopHooks, iterate_batches, *, world, rank: int,
          record: Callable[[LoopState, int], dict[str, Any]], has_valid: bool, bar) -> LoopResult:
    """Run optimizer steps ``state.step + 1 .. cfg.iters`` (fewer on early stop, Ctrl-C or SIGTERM).

    Args:
        runner: a ``StepRunner`` (its ``loss`` was chosen when it was built).
        state: loop counters, updated in place.
        cfg: the ``TrainConfig``.
        hooks: validate / save / emit / say / on_step callbacks.
        iterate_batches: ``(first_step, last_step) -> iterator of [micro-batch, ...]`` per step.
        world: the ``mx.distributed`` group.
        rank: this process's rank (dropout seeds differ per rank).
        record: builds a metrics record from the log window (and resets it).
        has_valid: a validation split exists.
        bar: a tqdm-like progress bar.

    Raises:
        TrainingDiverged: the loss, gradient norm or validation loss became NaN/inf; nothing of that
            step was saved, so the newest checkpoint is the last good one.
    """
    result = LoopResult()
    stop = StopFlag(world)
    first = state.step + 1
    with stop:
        for step, micro_batches in zip(range(first, cfg.iters + 1), iterate_batches(first, cfg.iters), strict=False):
            start = time.perf_counter()
            for micro, batch in enumerate(micro_batches):
                k = (step - 1) * len(micro_batches) + micro
                mx.random.seed((cfg.seed * 1_000_003 + k) * 131 + rank)  # dropout, reproducible on resume
                runner.accumulate(batch, last=micro == len(micro_batches) - 1)
            loss, tokens, inputs, grad_norm = runner.update()  # the step's one host sync
            _check_finite(step, loss=loss, gradient_norm=grad_norm)
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
            val_step = has_valid and (step == cfg.iters or (cfg.eval.every > 0 and step % cfg.eval.every == 0))
            rec: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step == cfg.iters or val_step:
                rec = record(state, step)
                if val_step:
                    val = hooks.validate()
                    _check_finite(step, validation_loss=val)
                    rec.update(val_loss=val, val_ppl=perplexity(val))
                    if val < state.best_val - cfg.eval.early_stopping_min_delta:
                        state.best_val, state.bad_evals = val, 0
                    else:
                        state.bad_evals += 1
                hooks.emit(rec)
                bar.set_postfix_str(postfix(rec))
            bar.update(1)
            patience = cfg.eval.early_stopping_patience
            if patience and state.bad_evals >= patience:
                result.stopped_early = True
                hooks.say(f"early stopping at step {step}: no validation improvement in {patience} evaluations")
            if cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0 and step < cfg.iters:
                hooks.save(step)
            if hooks.on_step is not None:
                hooks.on_step(step, rec)
            if result.stopped_early or stop.requested():
                break
    result.interrupted = stop.requested() and not result.stopped_early and state.step < cfg.iters
    return result


def perplexity(loss: float | None) -> float | None:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 50.0))


def postfix(record: dict) -> str:
    parts = [f"loss {record['train_loss']:.3f}"]
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.3f}")
    if record.get("tokens_per_sec"):
        parts.append(f"{record['tokens_per_sec']:.0f} tok/s")
    parts.append(f"peak {record['peak_memory_gb']:.2f} GB")
    return ", ".join(parts)


def _check_finite(step: int, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged at step {step}: the {name.replace('_', ' ')} is {value}; nothing of this step "
                "was saved (the newest checkpoint is the last good one). Lower optim.learning_rate or set "
                "optim.grad_clip, then start again")


class StopFlag:
    """Ctrl-C or SIGTERM asks to stop after the current step (a second signal aborts at once).

    SIGTERM is what schedulers and ``kill`` send; it gets the same checkpoint as Ctrl-C. In a
    distributed run every process must stop at the same step, so the flag is summed across processes
    each step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world):
        self.world, self.flag, self.previous = world, False, {}
        self._agreed = False

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step to save a checkpoint (again to abort without saving)",
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
