"""Every shipped recipe loads into its dataclass (a typo in a shipped YAML fails here, not for a user)."""

from pathlib import Path

import pytest

from mlx_med.config import load_config
from mlx_med.pipeline.runner import PipelineConfig
from mlx_med.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = ["demo.yaml", "qwen2.5-14b.yaml"]
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_configs_load(name):
    cfg = load_config(PipelineConfig, CONFIGS / name)
    assert cfg.pt.data.train is not None and cfg.sft.data.train is not None and cfg.eval.data
    assert 0.0 <= cfg.fuse.alpha <= 1.0
    assert (cfg.pt.phase, cfg.sft.phase) == ("pt", "sft")  # the section names the phase (pipeline.json too)


@pytest.mark.parametrize("name", RECIPES)
def test_training_recipes_load(name):
    cfg = load_config(TrainConfig, CONFIGS / name)
    assert cfg.phase in name


def test_demo_paths_exist():
    cfg = load_config(PipelineConfig, CONFIGS / "demo.yaml")
    root = CONFIGS.parent
    for path in [*cfg.eval.data, cfg.eval.ppl_data, cfg.sweep.data]:
        assert (root / path).is_file(), path


def test_home_is_expanded(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("base: {hf_path: ~/models/x, gguf: null}\n")
    assert load_config(PipelineConfig, path).base.hf_path == Path.home() / "models" / "x"
