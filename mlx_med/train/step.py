"""The math of one optimizer step: masked loss, token-weighted gradients, AdamW with warmup + cosine.

Gradients are summed per token over micro-batches (and processes), then divided by the total
number of loss tokens. So one step equals the step on the concatenated global batch whatever the
split: gradient accumulation and data parallelism change speed and memory, not the result.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from mlx_med.data.batches import Batch
from mlx_med.kernels import cross_entropy
from mlx_med.train.config import TrainConfig


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
                cache=None) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the masked targets, and their count. ``cache``: a fresh KV cache for a
    forward that takes no gradient (``StepRunner.validation_loss``)."""
    logits = model(inputs, cache=cache)
    ce = cross_entropy(logits, targets) * mask
    return ce.astype(mx.float32).sum(), mask.sum()


def selected_loss(head_split):
    """A loss that runs the output head only at masked positions (SFT: the prompt is not scored).

    ``head_split`` is ``(body, head)`` with model(x) == head(body(x)). The batch's mask decides which
    positions go through the (vocabulary-sized) head, which saves its compute and the logits' memory.
    """
    body, head = head_split

    def loss(model, inputs, targets, mask, positions, cache=None):
        hidden = body(inputs, cache=cache)
        hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
        ce = cross_entropy(head(hidden), targets.reshape(-1)[positions])
        return ce.astype(mx.float32).sum(), mx.array(positions.size, mx.float32)

    return loss


def split_head(model: nn.Module):
    """``(body, head)`` with model(x) == head(body(x)), or None when the architecture differs.

    Checked numerically on a short input, so a model whose forward adds anything after the head
    (soft-capping, logit scaling) falls back to the plain loss.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        return None
    head = getattr(model, "lm_head", None)
    if head is None:
        head = inner.embed_tokens.as_linear
    probe = mx.array([[1, 2, 3, 4]])
    try:
        want, got = model(probe), head(inner(probe))
        mx.eval(want, got)
    except Exception:  # any architecture mismatch means "not this shape of model"
        return None
    if want.shape != got.shape or not mx.allclose(want, got, rtol=1e-4, atol=1e-4).item():
        return None
    return inner, head


def build_schedule(cfg: TrainConfig):
    """Linear warmup 0 → lr over ``warmup_steps``, then cosine to ``min_lr_ratio``·lr at ``iters``."""
    lr, warmup = cfg.optim.learning_rate, cfg.schedule.warmup_steps
    end = lr * cfg.schedule.min_lr_ratio
    # mlx schedules see the optimizer's step counter, which starts at 0 for the first update.
    decay_steps = max(1, cfg.iters - warmup - 1)

    def schedule(step):
        step = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(step, mx.float32)
        warm = lr * (step + 1) / max(1, warmup)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + 0.5 * (lr - end) * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, cosine)

    return schedule


def build_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    o = cfg.optim
    return optim.AdamW(learning_rate=build_schedule(cfg), betas=[o.beta1, o.beta2], eps=o.eps,
                       weight_decay=o.weight_decay)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: recompute each block's activations in the backward pass.

    Swaps the class of this model's block instances for a subclass whose ``__call__`` is wrapped in
    ``mx.checkpoint`` (mlx-lm patches the shared class instead, which would leak into other models
    of the process).
    """
    for block in model.layers:
        block.__class__ = _checkpointed(type(block))


@functools.cache
def _checkpointed(cls: type) -> type:
    forward = cls.__call__

    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return forward(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


class StepRunner:
    """Runs micro-batches, accumulates summed gradients, applies the token-weighted update.

    The update (all-reduce, division by the token count, clipping, AdamW) always runs as one
    ``mx.compile``-d function: its shapes are those of the adapter, whatever the batch.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, grad_clip: float | None,
                 head_split=None, world: mx.distributed.Group | None = None, compile: bool = False,
                 loss=None):
        """``compile``: also trace forward + backward with ``mx.compile`` (worth it for fixed shapes,
        i.e. packed PT blocks; SFT batches change shape every step and would re-trace).
        ``loss``: ``loss(model, inputs, targets, mask) -> (summed loss, token count)`` replacing the
        default masked cross-entropy (``head_split`` is then ignored)."""
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.world_size = world.size() if world is not None else 1
        self.world = world
        self.selected = head_split is not None and loss is None
        self.custom_loss = loss is not None
        self.loss = loss or (selected_loss(head_split) if self.selected else masked_loss)
        value_and_grad = nn.value_and_grad(model, self.loss)
        self.value_and_grad = value_and_grad
        if compile:
            # The parameters and the dropout RNG are implicit inputs; value_and_grad writes the
            # traced parameters back into the model, so they are outputs too.
            state = [model.state, mx.random.state]
            traced = mx.compile(lambda *arrays: value_and_grad(model, *arrays), inputs=state, outputs=state)
            self.value_and_grad = lambda _model, *arrays: traced(*arrays)
        optimizer.init(model.trainable_parameters())
        state = [model.state, optimizer.state]
        self._apply = mx.compile(self._apply_update, inputs=state, outputs=state)
        self._grads = None
        self._loss_sum = mx.array(0.0)
        self._tokens = mx.array(0.0)
        self._inputs = 0

    def validation_loss(self, model: nn.Module, *arrays) -> tuple[mx.array, mx.array]:
        """``loss`` of a batch that takes no gradient. The built-in losses run its forward into a fresh KV
        cache, so its causal attention may take the fused prefill kernel (``kernels.ops.attention``: the
        bits of MLX's graph in about a third of its time); a loss given to the runner, or a model whose
        layers take other caches, runs as in training."""
        from mlx_med.evaluation.batch_cache import fresh_kv_cache

        if self.custom_loss:
            return self.loss(model, *arrays)
        return self.loss(model, *arrays, cache=fresh_kv_cache(model))

    def arrays(self, batch: Batch) -> tuple:
        arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask))
        if self.selected:
            import numpy as np

            arrays += (mx.array(np.flatnonzero(batch.mask.reshape(-1)).astype(np.uint32)),)
        return arrays

    def accumulate(self, batch: Batch, last: bool = False) -> None:
        """Forward + backward of one micro-batch; gradients are kept as per-token sums.

        ``last``: the step's final micro-batch, left lazy so that backward and update run as one graph.
        """
        (loss_sum, tokens), grads = self.value_and_grad(self.model, *self.arrays(batch))
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        self._loss_sum = self._loss_sum + loss_sum
        self._tokens = self._tokens + tokens
        self._inputs += batch.input_tokens
        if not last:  # bound memory: one micro-batch's graph at a time
            mx.eval(self._grads, self._loss_sum, self._tokens)

    def _apply_update(self, grads, counts):
        if self.world_size > 1:
            # One all-reduce for gradients and counts. Both are averaged over processes, so the
            # ratio below is Σ gradient sums / Σ tokens over all of them.
            reduced = average_gradients({"grads": grads, "counts": counts}, group=self.world)
            grads, counts = reduced["grads"], reduced["counts"]
        grads = tree_map(lambda g: g / counts[1], grads)
        if self.grad_clip is not None:
            grads, grad_norm = optim.clip_grad_norm(grads, self.grad_clip)
        else:  # still measured: the loop's NaN/inf guard reads it with the loss, at no extra sync
            grad_norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        self.optimizer.update(self.model, grads)
        return counts, grad_norm

    def update(self) -> tuple[float, int, int, float]:
        """Average over all tokens of all processes, clip, step.

        Returns:
            (mean loss of this step, loss tokens and input tokens across processes, gradient norm
            before clipping).
        """
        counts = mx.stack([self._loss_sum, self._tokens, mx.array(float(self._inputs))])
        counts, grad_norm = self._apply(self._grads, counts)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, counts, grad_norm)
        self._grads, self._loss_sum, self._tokens, self._inputs = None, mx.array(0.0), mx.array(0.0), 0
        loss_sum, tokens, inputs = counts.tolist()
        w = self.world_size
        return loss_sum / tokens, round(tokens * w), round(inputs * w), grad_norm.item()


def evaluate_loss(model: nn.Module, batches, loss, world: mx.distributed.Group | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over ``batches`` (this process's share), summed over processes."""
    total, tokens = mx.array(0.0), mx.array(0.0)
    for arrays in batches:
        loss_sum, count = loss(model, *arrays)
        total, tokens = total + loss_sum, tokens + count
        mx.eval(total, tokens)
    if world is not None and world.size() > 1:
        total = mx.distributed.all_sum(total, group=world, stream=mx.cpu)
        tokens = mx.distributed.all_sum(tokens, group=world, stream=mx.cpu)
    count = tokens.item()
    return (total.item() / count if count else float("nan")), int(count)
