from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mlx_med.config import dump_config, load_config
from mlx_med.errors import ConfigError


@dataclass
class Lora:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class Recipe:
    model: Path | None = None
    phase: Literal["pt", "sft"] = "pt"
    iters: int = 100
    learning_rate: float = 1e-4
    grad_checkpoint: bool = False
    lora: Lora = field(default_factory=Lora)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(Recipe)
    assert cfg.iters == 100 and cfg.lora.rank == 8 and cfg.model is None


def test_yaml_then_flags_override(tmp_path):
    path = write(tmp_path, "model: base\niters: 5\nlora:\n  rank: 4\n  targets: [o_proj]\n")
    cfg = load_config(Recipe, path, {"iters": 7, "lora.alpha": 2, "learning_rate": None})
    assert cfg.model == Path("base")
    assert cfg.iters == 7  # flag beats YAML
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 2.0 and cfg.lora.targets == ["o_proj"]
    assert cfg.learning_rate == 1e-4  # None flag leaves the default


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "iters: 5\nlora:\n  rank: 4\n  rnak: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    assert f"{path}:4: unknown key 'lora.rnak'" in str(err.value)
    assert "rank" in str(err.value)  # lists the known keys


def test_wrong_type_names_line(tmp_path):
    path = write(tmp_path, "iters: many\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:1: 'iters' must be an integer, got 'many'"):
        load_config(Recipe, path)


def test_literal_choices(tmp_path):
    path = write(tmp_path, "phase: dpo\n")
    with pytest.raises(ConfigError, match="'phase' must be one of 'pt', 'sft'"):
        load_config(Recipe, path)


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "iters: 5\nlora: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: invalid YAML"):
        load_config(Recipe, path)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(Recipe, "nope.yaml")


def test_section_and_round_trip(tmp_path):
    path = write(tmp_path, "train:\n  iters: 3\n  lora: {rank: 2}\neval: {}\n")
    cfg = load_config(Recipe, path, section="train")
    assert cfg.iters == 3 and cfg.lora.rank == 2
    again = load_config(Recipe, write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("field, value, message", [
    ("optim.learning_rate", "nan", "'optim.learning_rate' must be a finite number"),
    ("optim.learning_rate", "inf", "'optim.learning_rate' must be a finite number"),
    ("lora.alpha", "nan", "'lora.alpha' must be a finite number"),
    ("lora.alpha", -4, "'lora.alpha' must be a positive number"),
    ("optim.beta1", 2, "'optim.beta1' must be in \\[0, 1\\)"),
    ("optim.eps", 0, "'optim.eps' must be a positive number"),
    ("optim.grad_clip", "nan", "'optim.grad_clip' must be a finite number"),
    ("schedule.min_lr_ratio", "nan", "'schedule.min_lr_ratio' must be a finite number"),
    ("eval.early_stopping_patience", -1, "'eval.early_stopping_patience' must be at least 1"),
])
def test_float_settings_are_finite_and_in_range(field, value, message):
    from mlx_med.errors import ConfigError
    from mlx_med.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, {"model": "m", "data.train": "d", "output": "o", field: value}).check()


@pytest.mark.parametrize("flags, message", [
    (["--w-sft", "nan", "--w-pt", "0.5"], "'w_sft' must be a finite number"),
    (["--alpha", "inf"], "'alpha' must be a finite number"),
])
def test_nan_weight_flags_are_refused_with_one_line(tmp_path, flags, message):
    from click.testing import CliRunner

    from mlx_med.cli import cli

    result = CliRunner().invoke(cli, ["fuse", "--model", str(tmp_path), "--sft", str(tmp_path / "s"),
                                      "--pt", str(tmp_path / "p"), "-o", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty", "min_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decoding_refuses_non_finite_values(name, value):
    from mlx_med.errors import ConfigError
    from mlx_med.evaluation.decoding import DecodingConfig

    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        DecodingConfig(**{name: value})
