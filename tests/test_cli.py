import subprocess
import sys

from click.testing import CliRunner

from mlx_med.cli import cli


def test_help_lists_verbs():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "doctor" in result.output


def test_doctor_reports_gemm_and_fast_blas():
    # A fresh process: the BLAS is chosen when mlx is first imported.
    out = subprocess.run([sys.executable, "-m", "mlx_med.cli", "doctor", "--size", "512"],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("gemm: "))
    gflops = float(line.split()[1])
    assert "GFLOP/s" in line
    assert gflops > 0
    if sys.platform.startswith("linux"):
        # Which BLAS is mapped is deterministic; its speed is measured in scripts/bench_backend.py.
        assert "blas: OpenBLAS (OpenBLAS preloaded)" in out, out
    assert "compute: " in out


def test_user_error_is_one_line(tmp_path):
    import click

    from mlx_med.cli import FriendlyGroup
    from mlx_med.errors import UserError

    @click.group(cls=FriendlyGroup)
    def group():
        pass

    @group.command("boom")
    def boom():
        raise UserError("data.jsonl:3: field 'text': empty")

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 2
    assert "error: data.jsonl:3: field 'text': empty" in result.output
    assert "Traceback" not in result.output
