"""α: the one range rule, the one default, and α per module (schedules).

α weighs the SFT model against the PT model: w_sft = α, w_pt = 1 − α. In every command α lies in
[0, 1] (``check_alpha``); weights outside that range are only reachable through explicit
``--w-sft/--w-pt`` (``mlx_med.adapters.mix.pair_weights``). The default is ``DEFAULT_ALPHA``.

An α schedule gives α per adapted module: a default plus rules by layer range and module type, the
last matching rule winning (``--alpha-schedule FILE.yaml``)::

    default: 0.5
    rules:
      - layers: "20-29"                          # "7", "20-29" (inclusive) or a list of such
        modules: [gate_proj, up_proj, down_proj]  # module type = last name of the module path
        alpha: 0.2

A plain α is the schedule with no rules (``AlphaSchedule.constant``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.adapters.format import layer_index, module_type
from mlx_med.errors import DataError, UserError

DEFAULT_ALPHA = 0.5
ALPHA_RANGE = (0.0, 1.0)

def check_alpha(alpha: Any, name: str = "--alpha", cli_hint: bool = True) -> float:
    """α as a float, if it is a number in [0, 1] (the one range rule of every command).

    Args:
        cli_hint: point the message at ``--w-sft/--w-pt`` (off where there are no such flags: HTTP).

    Raises:
        UserError: not a number, or outside [0, 1].
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in [0, 1], got {alpha!r}") from None
    low, high = ALPHA_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        hint = " (for other weights give --w-sft X --w-pt Y)" if cli_hint else ""
        raise UserError(f"{name} must be in [0, 1], got {alpha}{hint}")
    return value


def alpha_weights(alpha: float) -> dict[str, float]:
    """``{"sft": α, "pt": 1 − α}`` for a checked α."""
    alpha = check_alpha(alpha)
    return {"sft": alpha, "pt": 1.0 - alpha}


@dataclass
class ScheduleRule:
    """α for the modules matching ``layers`` (inclusive ranges) and ``modules`` (module types)."""

    alpha: float
    layers: list[tuple[int, int]] | None = None
    modules: list[str] | None = None
    index: int = 0

    def matches(self, module_path: str) -> bool:
        if self.layers is not None:
            layer = layer_index(module_path)
            if layer is None or not any(lo <= layer <= hi for lo, hi in self.layers):
                return False
        return self.modules is None or module_type(module_path) in self.modules


@dataclass
class AlphaSchedule:
    """α per module: ``default`` unless a rule matches (the last matching rule wins).

    A plain α is ``AlphaSchedule.constant(α)``; ``source`` is the file it came from (None for a plain α).
    """

    default: float = DEFAULT_ALPHA
    rules: list[ScheduleRule] = field(default_factory=list)
    source: Path | None = None

    @classmethod
    def constant(cls, alpha: float = DEFAULT_ALPHA) -> AlphaSchedule:
        return cls(check_alpha(alpha))

    @property
    def is_constant(self) -> bool:
        return not self.rules

    def with_default(self, alpha: float) -> AlphaSchedule:
        """The same rules with another default (``/alpha`` and ``sweep alpha`` move the default)."""
        return AlphaSchedule(check_alpha(alpha), list(self.rules), self.source)

    def alpha_for(self, module_path: str) -> float:
        alpha = self.default
        for rule in self.rules:
            if rule.matches(module_path):
                alpha = rule.alpha
        return alpha

    def weights_for(self, module_path: str) -> dict[str, float]:
        """``{"sft": α_m, "pt": 1 − α_m}`` for one module path."""
        alpha = self.alpha_for(module_path)
        return {"sft": alpha, "pt": 1.0 - alpha}

    def check_against(self, modules: list[str]) -> None:
        """Refuse rules naming a layer or module type the adapters do not touch (file, rule, field)."""
        layers = {i for i in (layer_index(m) for m in modules) if i is not None}
        types = {module_type(m) for m in modules}
        where = self.source or "alpha schedule"
        for rule in self.rules:
            for lo, hi in rule.layers or []:
                missing = [i for i in range(lo, hi + 1) if i not in layers]
                if missing:
                    raise DataError(where, None, f"rules[{rule.index}].layers",
                                    f"layer {missing[0]} is not adapted (adapted layers: {_ranges(sorted(layers))})")
            for name in rule.modules or []:
                if name not in types:
                    raise DataError(where, None, f"rules[{rule.index}].modules",
                                    f"{name!r} is not an adapted module type (adapted: {', '.join(sorted(types))})")

    def describe(self) -> str:
        """``α = 0.5`` or ``α schedule FILE (default 0.5, 2 rules)``."""
        if self.is_constant:
            return f"α = {self.default:g}"
        return f"α schedule {self.source or ''} (default {self.default:g}, {len(self.rules)} rules)".replace("  ", " ")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source) if self.source else None, "default": self.default,
            "rules": [{"layers": [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in r.layers] if r.layers else None,
                       "modules": r.modules, "alpha": r.alpha} for r in self.rules],
        }


def schedule_yaml(schedule: AlphaSchedule) -> str:
    """The schedule as the YAML ``load_schedule`` reads (``default`` and ``rules``; unset fields left out)."""
    import yaml

    rules = [{k: v for k, v in rule.items() if v is not None} for rule in schedule.to_json()["rules"]]
    return yaml.safe_dump({"default": schedule.default, "rules": rules}, sort_keys=False, allow_unicode=True)


def load_schedule(path: str | Path) -> AlphaSchedule:
    """Read a schedule file: ``{default: A, rules: [{layers: "20-29", modules: [gate_proj], alpha: B}]}``.

    Raises:
        DataError: naming the file, rule index and field of a bad value.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"alpha schedule not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(path, None, None, "an alpha schedule is a mapping with 'default' and 'rules'")
    unknown = sorted(set(raw) - {"default", "rules"})
    if unknown:
        raise DataError(path, None, unknown[0], "unknown key (expected 'default' and 'rules')")
    default = _schedule_alpha(raw.get("default", DEFAULT_ALPHA), path, "default")
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise DataError(path, None, "rules", "must be a list of rules")
    rules = [_parse_rule(item, i, path) for i, item in enumerate(rules_raw)]
    return AlphaSchedule(default, rules, path)


def resolve_schedule(alpha: float | None = None, schedule: str | Path | AlphaSchedule | None = None) -> AlphaSchedule:
    """The schedule that ``--alpha`` / ``--alpha-schedule`` ask for.

    A schedule alone keeps its own ``default``; ``--alpha`` with it replaces that default (its rules stay:
    what ``/alpha`` and ``sweep alpha`` do); ``--alpha`` alone is the constant schedule; neither is
    ``DEFAULT_ALPHA``.
    """
    if isinstance(schedule, AlphaSchedule):
        plan = schedule
    elif schedule is not None:
        plan = load_schedule(schedule)
    else:
        return AlphaSchedule.constant(DEFAULT_ALPHA if alpha is None else alpha)
    return plan if alpha is None else plan.with_default(alpha)


def effective_alpha(alpha: float | None = None, schedule: str | Path | AlphaSchedule | None = None) -> float:
    """The α a run records: ``--alpha``, else the schedule's default, else ``DEFAULT_ALPHA``."""
    return resolve_schedule(alpha, schedule).default


def _parse_rule(item: Any, index: int, path: Path) -> ScheduleRule:
    where = f"rules[{index}]"
    if not isinstance(item, dict):
        raise DataError(path, None, where, "a rule is a mapping with 'alpha' and optional 'layers', 'modules'")
    unknown = sorted(set(item) - {"layers", "modules", "alpha"})
    if unknown:
        raise DataError(path, None, f"{where}.{unknown[0]}", "unknown key (expected layers, modules, alpha)")
    if "alpha" not in item:
        raise DataError(path, None, f"{where}.alpha", "missing")
    alpha = _schedule_alpha(item["alpha"], path, f"{where}.alpha")
    layers = None
    if item.get("layers") is not None:
        specs = item["layers"] if isinstance(item["layers"], list) else [item["layers"]]
        layers = [_layer_range(s, path, f"{where}.layers") for s in specs]
    modules = None
    if item.get("modules") is not None:
        names = item["modules"] if isinstance(item["modules"], list) else [item["modules"]]
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DataError(path, None, f"{where}.modules", "expected module type names such as [q_proj, v_proj]")
        modules = [n.strip().rsplit(".", 1)[-1] for n in names]
    return ScheduleRule(alpha, layers, modules, index)


def _schedule_alpha(value: Any, path: Path, where: str) -> float:
    try:
        return check_alpha(value, name="alpha")
    except UserError as err:
        raise DataError(path, None, where, str(err).split(" (for other")[0]) from None


def _layer_range(spec: Any, path: Path, where: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(spec))
    if isinstance(spec, bool) or not match:
        raise DataError(path, None, where, f"{spec!r}: expected a layer like \"7\" or a range like \"20-29\"")
    lo, hi = int(match[1]), int(match[2] or match[1])
    if hi < lo:
        raise DataError(path, None, where, f"{spec!r}: the range must not decrease")
    return lo, hi


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    out, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ", ".join(out)
