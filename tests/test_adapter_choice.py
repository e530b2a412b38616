"""The adapter-flag rule shared by eval, the safety suite, fuse and the live loader."""

import pytest

from mlx_med.adapters.mix import check_adapter_choice
from mlx_med.errors import UserError
from mlx_med.evaluation.runner import EvalConfig
from mlx_med.evaluation.safety import SafetyEvalConfig, run_safety_eval


@pytest.mark.parametrize(("adapter", "sft", "pt", "alpha", "message"), [
    ("a", "s", None, None, "not both"),
    (None, "s", None, None, "go together"),
    (None, None, "p", None, "go together"),
    (None, "s", "p", 1.5, r"\[0, 1\], got 1.5"),
])
def test_rejected_choices(adapter, sft, pt, alpha, message):
    with pytest.raises(UserError, match=message):
        check_adapter_choice(adapter, sft, pt, alpha)


@pytest.mark.parametrize(("adapter", "sft", "pt"), [(None, None, None), ("a", None, None), (None, "s", "p")])
def test_accepted_choices(adapter, sft, pt):
    check_adapter_choice(adapter, sft, pt, 0.0)
    check_adapter_choice(adapter, sft, pt, 1.0)


def test_eval_and_safety_apply_the_same_rule(tmp_path):
    with pytest.raises(UserError, match="go together"):
        EvalConfig(model=tmp_path, data=tmp_path / "d.jsonl", out=tmp_path / "o", sft=tmp_path).validate()
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run_safety_eval(SafetyEvalConfig(model=tmp_path, out=tmp_path / "o", sft=tmp_path, pt=tmp_path, alpha=-0.1))
