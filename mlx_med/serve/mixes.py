"""Which adapter weights a request asks for: model ids, the ``alpha`` field and llama.cpp's ``lora`` field.

A *mix* is a dict of weights on the attached adapters' models, as ``LiveAdapters.set_weights`` takes
them (``{"sft": α, "pt": 1 − α}`` for the study's pair). The server holds one server-wide mix (the
``merged`` model; llama.cpp's ``POST /lora-adapters`` changes it) and every request resolves to its
own mix here, before anything reaches the model. The range rule for α and scales is the one in
``mlx_med.adapters.mix``; this module only applies it.

Model ids with the SFT/PT pair: ``merged`` (the server-wide mix, or ``alpha`` from the request),
``merged@A`` (α fixed by the id), ``base`` (no adapter), ``pt``, ``sft`` (that run's model alone:
a stacked SFT run includes its PT run). With one ``--adapter``: ``adapter`` and ``base``. Without
adapters: ``base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlx_med.adapters.schedule import check_alpha
from mlx_med.errors import UserError
from mlx_med.serve.errors import ApiError


def check_weight(value: Any, where: str) -> float:
    """``value`` as an α / LoRA scale, or a 400 naming ``where``; the range rule is ``adapters.schedule.check_alpha``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{where} must be a number, got {value!r}", param=where)
    try:
        check_alpha(value, where, cli_hint=False)
    except UserError as err:
        raise ApiError(400, str(err), param=where) from None
    return float(value)


@dataclass
class MixCatalog:
    """The mixes one server offers.

    Attributes:
        adapters: attached adapter names in llama.cpp id order (``["sft", "pt"]``, ``["adapter"]``
            or ``["adapter", "stacked_on"]``, or none).
        paths: adapter name → its directory, for ``GET /lora-adapters``.
        weights: the server-wide mix (what ``merged`` / ``adapter`` means right now).
    """

    adapters: list[str]
    paths: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def pair(self) -> bool:
        return self.adapters == ["sft", "pt"]

    @property
    def default_id(self) -> str:
        return "merged" if self.pair else ("adapter" if self.adapters else "base")

    @property
    def alpha(self) -> float | None:
        """The server-wide α when the pair's weights sum to 1, else None."""
        w = self.weights
        if self.pair and math.isclose(w.get("sft", 0.0) + w.get("pt", 0.0), 1.0):
            return w["sft"]
        return None

    def model_ids(self) -> list[str]:
        """The ids ``/v1/models`` lists, the default first (``merged@A`` ids are accepted, not listed)."""
        if self.pair:
            return ["merged", "base", "pt", "sft"]
        return ["adapter", "base"] if self.adapters else ["base"]

    def lora_list(self, weights: dict[str, float] | None = None) -> list[dict]:
        """llama.cpp's ``GET /lora-adapters`` body: ``[{id, path, scale}]``."""
        weights = self.weights if weights is None else weights
        return [{"id": i, "path": self.paths.get(n, n), "scale": weights.get(n, 0.0)}
                for i, n in enumerate(self.adapters)]

    def parse_lora(self, entries: Any, where: str = "lora") -> dict[str, float]:
        """llama.cpp's ``[{"id": 0, "scale": 0.5}, ...]`` as a mix; adapters not listed get 0 (as there)."""
        if not isinstance(entries, list):
            raise ApiError(400, f"{where} must be a list of {{\"id\": N, \"scale\": X}} objects", param=where)
        weights = {n: 0.0 for n in self.adapters}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry or "scale" not in entry:
                raise ApiError(400, f"{where}[{i}] must be {{\"id\": N, \"scale\": X}}", param=f"{where}[{i}]")
            index = entry["id"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.adapters):
                raise ApiError(400, f"{where}[{i}].id: no adapter {index!r} (ids: 0..{len(self.adapters) - 1}, "
                                    "see GET /lora-adapters)", param=f"{where}[{i}].id")
            weights[self.adapters[index]] = check_weight(entry["scale"], f"{where}[{i}].scale")
        return weights

    def resolve(self, model: Any, alpha: Any = None, lora: Any = None) -> tuple[str, dict[str, float]]:
        """The model id to report and the mix of one request.

        Raises:
            ApiError: 404 for an unknown model id; 400 for ``alpha``/``lora`` with an id that fixes
                the mix, both at once, or out of range.
        """
        model = self.default_id if model is None else model
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", param="model")
        if alpha is not None and lora is not None:
            raise ApiError(400, "give either alpha or lora, not both", param="alpha")
        if model == self.default_id and self.adapters:
            if alpha is not None:
                if not self.pair:
                    raise ApiError(400, "alpha needs the SFT/PT pair (start the server with --sft RUN --pt RUN)",
                                   param="alpha")
                a = check_weight(alpha, "alpha")
                return model, {"sft": a, "pt": 1.0 - a}
            if lora is not None:
                return model, self.parse_lora(lora)
            return model, dict(self.weights)
        fixed = self._fixed(model)
        if fixed is None:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {', '.join(self.model_ids())}"
                                + (" and merged@A (0 ≤ A ≤ 1)" if self.pair else ""),
                           param="model", code="model_not_found", kind="invalid_request_error")
        for name, value in (("alpha", alpha), ("lora", lora)):
            if value is not None:
                raise ApiError(400, f"{name} cannot be combined with model {model!r}, which fixes the mix "
                                    f"(use model {self.default_id!r})", param=name)
        return model, fixed

    def _fixed(self, model: str) -> dict[str, float] | None:
        zeros = {n: 0.0 for n in self.adapters}
        if model == "base":
            return zeros
        if self.pair and model in ("sft", "pt"):
            return {**zeros, model: 1.0}
        if self.pair and model.startswith("merged@"):
            try:
                a = float(model.split("@", 1)[1])
            except ValueError:
                return None
            a = check_weight(a, "model")
            return {"sft": a, "pt": 1.0 - a}
        return None
