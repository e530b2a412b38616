"""Where the files mlx-med ships live: recipes and model configs (``configs/``), demo data and the safety
starter probes (``data/``).

In the repository they are top-level folders. An installed wheel carries them inside the package as
``mlx_med/shipped/configs`` and ``mlx_med/shipped/data`` (pyproject's package-dir mapping), found here
through ``importlib.resources``; a source checkout (editable install) reads the folders in place. Every
other module asks this one, so nothing depends on where the checkout is or on the current folder.
"""

from __future__ import annotations

import glob
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED_FOLDERS = ("configs", "data")
RECIPE_SUFFIXES = (".yaml", ".yml")


def shipped_root() -> Path:
    """The folder holding ``configs/`` and ``data/``: inside the installed package, else the checkout."""
    installed = Path(str(resources.files("mlx_med") / "shipped"))
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[1]  # editable install: the repository root


def shipped_path(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``shipped_path("data", "safety", "probes.jsonl")``."""
    if not parts or parts[0] not in SHIPPED_FOLDERS:
        raise ValueError(f"shipped files live under {' or '.join(SHIPPED_FOLDERS)}, not {parts[:1]}")
    return shipped_root().joinpath(*parts)


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called ``name`` (``demo`` → ``configs/demo.yaml``), or None."""
    if not name or "/" in name or "\\" in name:
        return None
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in RECIPE_SUFFIXES else name
    for suffix in RECIPE_SUFFIXES:
        candidate = shipped_path("configs", stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def resolve_recipe(value: Path) -> Path:
    """``-c VALUE``: an existing file as given, else a shipped recipe of that name, else as given."""
    if value.exists():
        return value
    return shipped_recipe(str(value)) or value


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the shipped files (a shipped recipe, say)."""
    try:
        path.resolve().relative_to(shipped_root().resolve())
    except ValueError:
        return False
    return True


def localize_shipped_paths(raw: Any) -> Any:
    """In a shipped recipe, point relative ``data/...`` and ``configs/...`` paths at the shipped files.

    A path (or glob) that matches something from the current folder is kept as written, so a checkout's
    ``mlx-med pipeline -c configs/demo.yaml`` behaves as before; one that matches only among the shipped
    files becomes absolute, so ``mlx-med pipeline -c demo`` works from any folder.
    """
    if isinstance(raw, dict):
        return {key: localize_shipped_paths(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [localize_shipped_paths(value) for value in raw]
    if not isinstance(raw, str) or Path(raw).is_absolute() or Path(raw).parts[:1] not in {(f,) for f in SHIPPED_FOLDERS}:
        return raw
    if glob.glob(raw):
        return raw
    shipped = shipped_root() / raw
    return str(shipped) if glob.glob(str(shipped)) else raw
