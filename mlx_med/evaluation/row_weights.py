"""Rows of one ``BatchGenerator`` batch with their own adapter weights (several α in one forward pass).

mlx-lm's ``BatchGenerator`` filters finished rows out of its batch and refills it from the queue, so
row *i* of a forward is not request *i*. ``RowWeightedModel`` wraps the model it is given: before each
forward it reads the calling batch's uids and sets the live LoRA layers' per-row coefficients
(``LiveAdapters.set_row_weights``) to those uids' weights. The generation engine (``generate_batch``
with ``row_weights``) and the server's scheduler both run their batches through it.
"""

from __future__ import annotations

import sys


class RowWeightedModel:
    """The model as ``BatchGenerator`` sees it: each forward first gives every batch row its weights.

    mlx-lm's batch objects (the prompt-processing batch and the generation batch) call
    ``self.model(inputs, cache=...)`` with one input row per entry of their ``uids``; this wrapper
    reads those uids from the calling batch, so rows stay matched to requests however the batch
    is filtered, split or extended. Everything else (``layers``, ``make_cache``) is the model's.

    Args:
        model: the mlx-lm model with ``live`` attached.
        live: ``LiveAdapters``, or None (then the wrapper only passes calls through).
        weights_by_uid: uid → adapter weights (``{"sft": α, "pt": 1 − α}``); read at each forward,
            so the caller may add uids after inserting their prompts.
    """

    def __init__(self, model, live, weights_by_uid: dict[int, dict[str, float]]):
        self.model, self.live, self.weights_by_uid = model, live, weights_by_uid
        self._rows: list[int] | None = None  # the uids the layers' per-row weights are set for

    def forget_rows(self) -> None:
        """Forget which rows the layers are set for (a new generator numbers its rows from 0 again)."""
        self._rows = None

    def current_weights(self) -> list[dict[str, float]]:
        """The weights of the rows the layers are set for (those of the forward being run)."""
        return [self.weights_by_uid[uid] for uid in self._rows or []]

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        if self.live is not None:
            batch = sys._getframe(1).f_locals.get("self")
            uids = getattr(batch, "uids", None)
            if uids is None or len(uids) != inputs.shape[0]:
                raise RuntimeError("mlx-lm's batch generator no longer calls the model from a batch with "
                                   "one uid per row; per-row adapter weights cannot be matched to requests")
            if uids != self._rows:  # most decoding steps run the same rows as the one before
                self.live.set_row_weights([self.weights_by_uid[uid] for uid in uids])
                self._rows = list(uids)
        return self.model(inputs, cache=cache, **kwargs)
