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
