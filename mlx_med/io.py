"""Output folders and files: atomic writes, the one rule for replacing a folder, and folder locks.

* ``atomic_write_text`` / ``atomic_write_json``: a file appears complete or not at all.
* ``check_output_dir``: whether ``-o`` may be written (or, with ``--force``, replaced). Checked before
  any model or data is loaded, so a refused ``-o`` costs nothing.
* ``atomic_output_dir``: build a folder under a temporary name; the old one goes only once the new
  one is complete.
* ``cache_dir``: the one place for rebuildable caches.
* ``output_lock``: one process per output folder (``fcntl.flock``: released by the kernel when the
  process dies, so it can never go stale).

A folder mlx-med writes carries a marker file (``MARKER``); ``--force`` replaces only such folders
(or empty ones), never the current or home folder, a filesystem root, or a folder holding an input.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlx_med.errors import UserError

MARKER = ".mlx-med"  # in every folder mlx-med writes: proof that --force may replace it
LOCK = ".mlx-med.lock"  # the pid of the process holding a folder's lock (run, eval, sweep, pipeline)
# Files that identify a folder written by mlx-med before it wrote the marker.
LEGACY_SIGNS = ("run.yaml", "done.json", ".pipeline")
LEFTOVER_SUFFIXES = (".tmp.safetensors", ".partial", ".old", ".tmp")  # temp names of our writers


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """Where mlx-med keeps what it can rebuild (BLAS verdicts, file fingerprints, compiled kernels):
    ``$MLX_MED_CACHE``, else ``$XDG_CACHE_HOME/mlx-med``, else ``~/.cache/mlx-med``."""
    env = os.environ if env is None else env
    if env.get("MLX_MED_CACHE"):
        return Path(env["MLX_MED_CACHE"])
    return Path(env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "mlx-med"


def atomic_save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG to a temp file beside ``path``, rename it over ``path``, close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``.

    Args:
        path: the file to (re)place.
        text: its whole content.
        mode: permission bits; default: what ``open()`` would give under the current umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a full disk: name the file we were writing
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    return path


def save_safetensors(path: str | Path, arrays: dict, metadata: dict[str, str] | None = None) -> Path:
    """``mx.save_safetensors`` whose failure names the file (MLX says only "Unable to write 8 bytes").

    Raises:
        OSError: ENOSPC when the filesystem is (nearly) full, else EIO; ``filename`` is ``path``.
    """
    import mlx.core as mx

    path = Path(path)
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as err:
        with contextlib.suppress(OSError):
            if path.is_file():
                path.unlink()
        code = errno.ENOSPC if _nearly_full(path.parent) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({err})", str(path)) from None
    return path


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 << 20
    except OSError:
        return False


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def has_content(path: str | Path) -> bool:
    """True when folder ``path`` holds anything besides mlx-med's bookkeeping (marker, lock)."""
    return any(p.name not in (MARKER, LOCK) for p in Path(path).iterdir())


def is_mlx_med_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder mlx-med wrote (it holds the marker, or a run/pipeline file)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (MARKER, *LEGACY_SIGNS))


def mark_dir(path: str | Path) -> None:
    """Write the marker that lets a later ``--force`` replace ``path``."""
    from mlx_med import __version__

    marker = Path(path) / MARKER
    if not marker.exists():
        atomic_write_json(marker, {"written_by": "mlx-med", "version": __version__})


def check_output_dir(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path | None] = (),
                     reuse: bool = False, flag: str = "-o") -> Path:
    """Raise ``UserError`` unless ``out`` may be created, reused or replaced; cheap (no loading).

    Args:
        out: the output folder asked for.
        force: the user allows replacing an existing folder (only one mlx-med wrote, or an empty one).
        inputs: paths the command reads (model, data, adapters): ``out`` must not be or contain one.
        reuse: the command continues an existing mlx-med folder in place (resume, a pipeline re-run),
            so an existing marked folder is fine without ``force``.
        flag: how the user named ``out``, for messages.

    Returns:
        ``out`` as given.
    """
    out = Path(out)
    check_output_location(out, inputs=inputs, flag=flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a folder")
    if not out.exists() or not has_content(out):
        return out
    ours = is_mlx_med_dir(out)
    if reuse and ours:
        return out
    if reuse and not ours:
        raise UserError(f"{flag} {out} is not empty and was not written by mlx-med; choose another folder")
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not ours:
        raise UserError(f"{out} is not empty and was not written by mlx-med; --force replaces only "
                        "mlx-med's own folders: remove it yourself or choose another folder")
    return out


def check_output_location(out: str | Path, inputs: Iterable[str | Path | None] = (), flag: str = "-o") -> None:
    """Refuse an output folder that is a filesystem root, the current or home folder (or holds one of
    them), or that is or holds one of ``inputs``; its contents are not looked at."""
    out = Path(out)
    where = out.expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if where.parent == where:
        raise UserError(f"{flag} {out} is a filesystem root; choose a new folder for the output")
    if where == cwd or where in cwd.parents:
        raise UserError(f"{flag} {out} is the current folder (or holds it); choose a new folder for the output")
    if where == home or where in home.parents:
        raise UserError(f"{flag} {out} is the home folder (or holds it); choose a new folder for the output")
    for item in inputs:
        if item is None or not str(item):
            continue
        source = Path(item).expanduser().resolve()
        if source == where or where in source.parents:
            raise UserError(f"{flag} {out} holds an input ({item}); choose another folder for the output")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False,
                      inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temp directory beside ``out``; on success it replaces ``out``.

    ``out`` is checked with ``check_output_dir`` first (and again before the swap, so a folder that
    another process finished meanwhile is not silently replaced). On error or Ctrl-C the temp folder
    is removed and ``out`` is left as it was; the old ``out`` is removed only after the new one is in
    place.
    """
    out = Path(out)
    check_output_dir(out, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent, f".{out.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        mark_dir(tmp)
        check_output_dir(out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "old")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def clean_leftovers(folder: str | Path, prefix: str = ".") -> list[Path]:
    """Remove ``.partial`` / ``.old`` folders and ``.tmp`` files of killed mlx-med processes.

    Only names that carry a pid (ours: ``.NAME.PID.xxx.partial``) whose process is gone are removed,
    so a concurrent process's work in progress is left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = path.name
        if not name.startswith(prefix) or not name.endswith(LEFTOVER_SUFFIXES):
            continue
        pid = _pid_in(name, LEFTOVER_SUFFIXES)
        if pid is not None and _alive(pid):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the ``with`` block.

    The lock is ``flock`` on the folder itself, so the kernel drops it when the process dies (never
    stale) and nothing is left behind; ``LOCK`` inside holds the holder's pid while it runs, for the
    message others get.

    Raises:
        UserError: "FOLDER is in use by pid N" when another process holds it (at once, no waiting).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    failed = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = (folder / LOCK).read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise UserError(f"{folder} is in use by pid {holder}; wait for it to finish or use another folder") from None
        atomic_write_text(folder / LOCK, f"{os.getpid()}\n")
        try:
            yield folder
            failed = False
        finally:
            (folder / LOCK).unlink(missing_ok=True)
    finally:
        if failed and created and folder.is_dir() and not has_content(folder):
            shutil.rmtree(folder, ignore_errors=True)  # a command that failed before writing leaves no folder
        os.close(fd)  # releases the lock


def _pid_in(name: str, suffixes: tuple[str, ...]) -> int | None:
    """The pid in ``.BASE.PID.RANDOM<suffix>`` (our temp names), or None (an older, pid-less name)."""
    for suffix in suffixes:
        if name.endswith(suffix):
            parts = name[: -len(suffix)].rsplit(".", 2)
            return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
