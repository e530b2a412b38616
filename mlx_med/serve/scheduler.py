"""Continuous batching across adapter mixes: one model forward serves requests at different α.

The scheduler owns the model on one worker thread and drives mlx-lm's ``BatchGenerator``: requests
join the running batch as soon as they arrive and leave it when they finish or are cancelled (a
client that hangs up frees its slot at the next step). Each row of the batch keeps its own adapter
weights: before every forward the live LoRA layers get one coefficient per row
(``LiveAdapters.set_row_weights``, matched to rows by
``mlx_med.evaluation.row_weights.RowWeightedModel``), so eight clients at eight α values share one pass.
Requests that arrive together and begin alike (a system prompt) compute that start once per α among
them, where that keeps every bit (``mlx_med.evaluation.shared_prefix``): the model is wrapped as
``generate_batch`` wraps it (``generate.generator_model``).

The HTTP side (an asyncio event loop) only calls ``submit`` and ``cancel``; tokens come back on each
job's asyncio queue as ``(token, finish_reason)`` pairs, or an exception if the step failed.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from mlx_med.evaluation.generate import generator_model
from mlx_med.serve.schemas import Sampling


@dataclass
class Job:
    """One request's place in the batch; the HTTP handler reads ``queue``."""

    prompt: list[int]
    weights: dict[str, float]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    uid: int | None = None
    cancelled: bool = False

    def post(self, event: Any) -> None:
        """Hand ``event`` to the event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def make_request_sampler(sampling: Sampling, vocab_size: int):
    """A sampler with its own random key, so a seeded request draws the same tokens in any batch.

    Returns None for greedy requests: they share the batch's argmax, one call for all rows.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    if sampling.greedy:
        return None
    seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
    state = {"key": mx.random.key(seed % 2**32)}
    top_k = sampling.top_k if 0 < sampling.top_k < vocab_size else 0

    def sample(logprobs):
        if sampling.top_p < 1.0:
            logprobs = apply_top_p(logprobs, sampling.top_p)
        if top_k:
            logprobs = apply_top_k(logprobs, top_k)
        state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1.0 / sampling.temperature), key=key)

    return sample


class Scheduler:
    """The worker that runs every request through one ``BatchGenerator``.

    Args:
        model: an mlx-lm model with ``live`` adapters attached (or none).
        live: ``LiveAdapters`` for per-row weights; None serves the base model only.
        stop_tokens: token ids that end an answer (the tokenizer's end-of-turn ids).
        vocab_size: for clamping ``top_k``.
        batch_size: sequences decoded (and prompts read) together; more requests wait their turn.
    """

    def __init__(self, model, live, stop_tokens: list[int], vocab_size: int, batch_size: int = 8):
        self._weights: dict[int, dict[str, float]] = {}
        # requests that arrive together and begin alike (a client's system prompt) share that start's prefill
        self._model, self.shared_prefix = generator_model(model, live, self._weights)
        self._stop_tokens, self._vocab_size, self._batch_size = stop_tokens, vocab_size, batch_size
        self._cond = threading.Condition()
        self._pending: list[Job] = []
        self._cancelled: list[Job] = []
        self._stopping = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx-med-serve-batch", daemon=True)
        self.active = 0  # requests in the batch (for /health)

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: list[int], weights: dict[str, float], sampling: Sampling) -> Job:
        """Queue a request; call from the event loop. Tokens arrive on ``job.queue``."""
        job = Job(prompt, weights, sampling, asyncio.get_running_loop())
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Take ``job`` out of the batch at the next step (a no-op once it finished)."""
        with self._cond:
            job.cancelled = True
            self._cancelled.append(job)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still running and end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._stopped.wait(timeout)

    def _generator(self):
        from mlx_lm.generate import BatchGenerator

        self._model.forget_rows()  # a new generator numbers its rows from 0 again
        # Its default stream (mlx-lm's thread-local generation stream) works from this thread.
        return BatchGenerator(
            self._model, stop_tokens=[[t] for t in self._stop_tokens],
            completion_batch_size=self._batch_size, prefill_batch_size=self._batch_size,
        )

    def _run(self) -> None:
        gen = self._generator()
        jobs: dict[int, Job] = {}
        while True:
            with self._cond:
                while not (self._pending or self._cancelled or jobs or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    for job in [*jobs.values(), *self._pending]:
                        job.post(asyncio.CancelledError("the server is shutting down"))
                    break
                new, self._pending = self._pending, []
                cancelled, self._cancelled = self._cancelled, []
            try:
                self._step(gen, jobs, new, cancelled)
            except Exception as err:  # a failed step fails the requests in it, not the server
                for job in [*jobs.values(), *(j for j in new if j.uid not in jobs)]:
                    job.post(err)
                jobs.clear()
                self._weights.clear()
                gen.close()
                gen = self._generator()
            self.active = len(jobs)
        gen.close()
        if self._model.live is not None:  # hand the model back at its model-wide mix, not the last rows'
            self._model.live.clear_row_weights()
        self._stopped.set()
        # The thread stays parked until the process exits: a thread that ran MLX work and ended
        # before interpreter shutdown sometimes made the exit abort ("terminate called without an
        # active exception", status 134) in MLX's C++ teardown; a parked daemon thread never did.
        threading.Event().wait()

    def _step(self, gen, jobs: dict[int, Job], new: list[Job], cancelled: list[Job]) -> None:
        """Take cancelled jobs out, put new ones in, and advance the batch by one step."""
        from mlx_med.evaluation.batch_cache import in_place_caches

        gone = sorted({job.uid for job in cancelled if job.uid in jobs})  # a job may be cancelled twice
        if gone:
            gen.remove(gone)
            for uid in gone:
                del jobs[uid]
                self._weights.pop(uid, None)
        for job in new:
            if job.cancelled:
                continue
            sampler = make_request_sampler(job.sampling, self._vocab_size)
            uid = gen.insert([job.prompt], [job.sampling.max_tokens], samplers=[sampler],
                             caches=in_place_caches(self._model, self._batch_size, 1))[0]
            job.uid, jobs[uid], self._weights[uid] = uid, job, job.weights
        self.active = len(jobs)
        if not jobs:
            return
        _, responses = gen.next()
        for r in responses:
            job = jobs.get(r.uid)
            if job is None:
                continue
            job.post((r.token, r.finish_reason))
            if r.finish_reason is not None:
                del jobs[r.uid]
                self._weights.pop(r.uid, None)
