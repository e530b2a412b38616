import pytest

from mlx_med.errors import UserError
from mlx_med.io import atomic_output_dir, atomic_write_json, mark_dir


def test_atomic_output_dir_commits_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert (out / ".mlx-med").is_file()  # the marker that lets a later --force replace it
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_dir_leaves_nothing_on_error_and_keeps_old(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    mark_dir(out)  # written by mlx-med: --force may replace it
    with pytest.raises(UserError, match="already exists; pass --force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == [".mlx-med", "old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_json(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"bleu-4": 1.5, "zh": "中文"})
    assert "中文" in path.read_text()


def test_atomic_write_uses_the_usual_file_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "m.json", {})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- output folder rules


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", [".", "~", "data-holder", "foreign"])
@pytest.mark.parametrize("force", [False, True])
def test_dangerous_output_folders_are_refused_and_nothing_is_lost(tmp_path, monkeypatch, target, force):
    from mlx_med.io import check_output_dir

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    work = tmp_path / "work"
    (work / "data-holder").mkdir(parents=True)
    (work / "data-holder" / "train.jsonl").write_text('{"text": "x"}\n')
    (work / "foreign").mkdir()
    (work / "foreign" / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="current folder|home folder|holds an input|not written by mlx-med|--force"):
        check_output_dir(target, force=force, inputs=["data-holder/train.jsonl"])
    with pytest.raises(UserError):
        with atomic_output_dir(target, force=force, inputs=["data-holder/train.jsonl"]) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _snapshot(tmp_path) == before


def test_force_replaces_an_mlx_med_folder_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v1.txt").write_text("1")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "v2.txt").write_text("2")
        assert (out / "v1.txt").read_text() == "1"  # the old folder is untouched while the new one is built
    assert sorted(p.name for p in out.iterdir()) == [".mlx-med", "v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_finished_meanwhile_is_not_silently_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="already exists"):
        with atomic_output_dir(out) as tmp:
            (tmp / "late.txt").write_text("second")
            out.mkdir()  # another process finished first
            (out / "first.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["first.txt"]


def test_leftovers_of_killed_processes_are_cleaned_but_live_ones_kept(tmp_path):
    import os

    from mlx_med.io import clean_leftovers

    dead = tmp_path / ".out.999999999.abc.partial"  # no such pid
    dead.mkdir()
    live = tmp_path / f".out.{os.getpid()}.abc.partial"
    live.mkdir()
    (tmp_path / ".out.partial-but-not-ours.txt").write_text("keep")
    removed = clean_leftovers(tmp_path, ".out.")
    assert removed == [dead] and live.exists() and (tmp_path / ".out.partial-but-not-ours.txt").exists()


# ---------------------------------------------------------------- locks


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    import subprocess
    import sys

    from mlx_med.io import output_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mlx_med.io import output_lock\n"
        f"with output_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"run is in use by pid {holder.pid}\b"):
            with output_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(folder):  # the kernel released the dead holder's lock: never stale
        pass


# ---------------------------------------------------------------- full disk


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import os

    import mlx.core as mx

    from mlx_med import io

    target = tmp_path / "w.safetensors"
    os.symlink("/dev/full", target)  # every write to it fails with ENOSPC, as on a full filesystem
    with pytest.raises(OSError) as err:
        io.save_safetensors(target, {"a": mx.zeros((4096,))})
    assert err.value.filename == str(target)

    real_mkstemp = io.tempfile.mkstemp

    def full_mkstemp(prefix, suffix, dir):
        fd, tmp = real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        os.close(fd)
        os.unlink(tmp)
        os.symlink("/dev/full", tmp)
        return os.open(tmp, os.O_WRONLY), tmp

    monkeypatch.setattr(io.tempfile, "mkstemp", full_mkstemp)
    with pytest.raises(OSError) as err:
        atomic_write_json(tmp_path / "metrics.json", {"x": "y" * 100_000})
    assert err.value.filename == str(tmp_path / "metrics.json") and "space" in err.value.strerror
    assert not (tmp_path / "metrics.json").exists()
