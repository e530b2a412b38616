"""Every command's -o follows one rule: never the current or home folder, a folder holding an input,
or (even with --force) a non-empty folder mlx-med did not write. Nothing a user had is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from random_adapters import make_adapter

from mlx_med.cli import cli


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, tiny_llama, monkeypatch):
    """cwd = work/ holding a model, an adapter, data, notes and a foreign folder; HOME = a temp folder."""
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    make_adapter(work / "model", work / "adapter", phase="sft")
    (work / "data").mkdir()
    (work / "data" / "eval.jsonl").write_text('{"prompt": "q?", "response": "a"}\n')
    (work / "notes.txt").write_text("keep me")
    (work / "foreign").mkdir()
    (work / "foreign" / "thesis.tex").write_text("years of work")
    home = tmp_path / "home"
    home.mkdir()
    (home / "diary.txt").write_text("private")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return tmp_path


TARGETS = [".", "~", "foreign", "model", "data"]
COMMANDS = {
    "fuse": ["fuse", "--model", "model", "--adapter", "adapter"],
    "export": ["export", "model"],
    "merge": ["merge", "--sft", "adapter", "--pt", "adapter", "--alpha", "0.5"],
    "convert": ["convert", "--hf-path", "model"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("force", [False, True])
def test_commands_refuse_dangerous_outputs_and_lose_nothing(workspace, command, force):
    before = _files(workspace)
    for target in TARGETS:
        if command != "fuse" and target == "data":
            continue
        args = [*COMMANDS[command], "-o", str(Path("~") if target == "~" else target), *(["--force"] if force else [])]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, (args, result.output)
    assert _files(workspace) == before
    assert not [p for p in workspace.rglob("*.partial")]


def test_pipeline_refuses_a_foreign_or_input_folder(workspace):
    config = workspace / "work" / "pipeline.yaml"
    config.write_text("base: {model: model}\npt: {data: {train: data/eval.jsonl}}\n"
                      "sft: {data: {train: data/eval.jsonl}}\neval: {data: [data/eval.jsonl]}\n")
    before = _files(workspace)
    for target in [".", "~", "foreign", "data"]:
        result = CliRunner().invoke(cli, ["pipeline", "-c", str(config), "-o", target])
        assert result.exit_code == 2, (target, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert _files(workspace) == before
