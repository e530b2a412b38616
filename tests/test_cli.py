import os
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
        from mlx_med.blas import candidate_libraries

        if candidate_libraries():  # an OpenBLAS is installed: one of them is chosen, or each is explained
            assert "blas: OpenBLAS (" in out or "blas not used: " in out, out
    assert "(policy auto)" in out and "numpy's own: " in out
    assert any(ln.startswith("batch invariance: yes (") or ln.startswith("batch invariance: no (")
               for ln in out.splitlines()), out
    assert any(ln.startswith("malloc: ") for ln in out.splitlines()), out
    assert "batch cache: in place" in out, out
    from mlx_med.kernels.build import unsupported_reason

    if "compute float32" in out and unsupported_reason() is None:  # the CPU fp32 path, where they build
        assert "kernels: mlx-med (" in out, out
        assert any(ln.startswith("packed projections: OpenBLAS's ") or ln.startswith("packed projections: off: ")
                   for ln in out.splitlines()), out


def test_doctor_names_the_compute_policy_from_flag_and_environment():
    env = {**os.environ, "MLX_MED_COMPUTE_POLICY": "accelerator"}
    out = subprocess.run([sys.executable, "-m", "mlx_med.cli", "doctor", "--size", "64"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "compute float32" not in out and "(policy accelerator)" in out, out
    assert "quantized weights kept quantized" in out and "kernels:" not in out
    out = subprocess.run([sys.executable, "-m", "mlx_med.cli", "doctor", "--size", "64", "--compute-policy", "fp32"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "compute float32, quantized weights dequantized (policy fp32)" in out, out
    bad = subprocess.run([sys.executable, "-m", "mlx_med.cli", "doctor", "--size", "64"],
                         env={**env, "MLX_MED_COMPUTE_POLICY": "fast"}, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: MLX_MED_COMPUTE_POLICY=fast: expected one of auto, fp32, accelerator"]


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
