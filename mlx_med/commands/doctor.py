"""``mlx-med doctor``: what MLX runs on here, how fast, and which compute path mlx-med will take."""

from __future__ import annotations

import sys

import click

from mlx_med.commands.options import compute_policy_option

MIN_GOOD_GFLOPS = 50.0


def running_library_info(library):
    """The library's build facts and core as it runs now (the start-up verdict's copy may predate an
    ``OPENBLAS_CORETYPE`` override), or None when it cannot be asked."""
    from mlx_med.blas_check import query_library

    try:
        return query_library(library)
    except OSError:
        return None


@click.command("doctor")
@click.option("--size", default=1024, show_default=True, help="GEMM size n for the n×n×n probe.")
@compute_policy_option(warn_slow_blas=False)
def command(size: int) -> None:
    """Check the MLX install: device, BLAS (library, core, threads, safety verdict), GEMM speed, compute path,
    and on the CPU fp32 path whether mlx-med's vectorized SwiGLU/attention kernels are built and in use.

    The GEMM line also gives numpy's own fp32 GEMM at the same size, a yardstick for this CPU. The batch
    invariance line says whether a row's matmul result depends on the rows beside it: where it does,
    batched generation (eval, sweeps, the server) can answer differently from one row at a time in near-ties.
    The malloc line says whether freed memory stays in the process for reuse (Linux, glibc); the batch
    cache line, which KV cache batched generation refills (``MLX_MED_BATCH_CACHE``); the packed
    projections line, whether generation runs OpenBLAS's kernel over weights packed once
    (``MLX_MED_PACKED_WEIGHTS``).
    """
    import mlx_med
    from mlx_med.blas import blas_in_use, preload_blas
    from mlx_med.malloc import tune_malloc

    try:
        import mlx.core as mx

        from mlx_med import backend
    except Exception as err:  # a broken wheel fails here in many ways
        click.echo(f"error: MLX cannot be imported: {err}", err=True)
        sys.exit(1)
    info = backend.detect_backend()  # a bad MLX_MED_COMPUTE_POLICY is a one-line UserError
    try:
        gflops = backend.gemm_gflops(size)
    except Exception as err:
        click.echo(f"error: MLX is installed but cannot run a matmul: {err}", err=True)
        sys.exit(1)

    status = preload_blas()
    mem = backend.system_memory_gb()
    click.echo(f"mlx-med: {mlx_med.__version__}")
    click.echo(f"platform: {backend.platform_line()}")
    click.echo(f"mlx: {mx.__version__}")
    click.echo(f"device: {info.device} (accelerator: {info.accelerator})")
    click.echo(f"blas: {blas_in_use()} ({status.note})")
    if status.library:
        click.echo(f"blas library: {status.library}")
        info_now = running_library_info(status.library) or status.info
        if info_now:
            click.echo(f"blas core: {info_now.core} ({info_now.config})")
        click.echo(f"blas threads: {status.threads}")
        click.echo(f"blas idle threads: {status.idle_spin}")
        click.echo(f"blas verdict: {status.verdict}")
    for library, verdict in status.considered:
        if library != status.library:
            click.echo(f"blas not used: {library}: {verdict}")
    click.echo(f"gemm: {gflops:.1f} GFLOP/s (fp32, {size}x{size}x{size}; numpy's own: "
               f"{backend.numpy_gemm_gflops(size):.1f} GFLOP/s)")
    click.echo(f"batch invariance: {backend.gemm_batch_invariance().describe()}")
    click.echo(f"memory: {mem:.1f} GB" if mem else "memory: unknown")
    click.echo(f"malloc: {tune_malloc().note}")
    click.echo(f"compute: {info.describe()}")
    if info.device == "cpu" and not info.quantized_compute:
        from mlx_med.kernels import recheck_cpu_kernels

        kernels, reason = recheck_cpu_kernels()
        click.echo(f"kernels: {'mlx-med' if kernels else 'MLX'} ({reason})")
        from mlx_med.kernels import describe_packing

        click.echo(f"packed projections: {describe_packing()}")
    from mlx_med.evaluation.batch_cache import describe as describe_batch_cache

    click.echo(f"batch cache: {describe_batch_cache()}")
    from mlx_med.evaluation.shared_prefix import describe as describe_shared_prefix

    click.echo(f"shared prompt start: {describe_shared_prefix()}")
    if info.device == "cpu" and gflops < MIN_GOOD_GFLOPS:
        click.echo(
            f"warning: fp32 GEMM is slow ({gflops:.1f} GFLOP/s); training will crawl. {status.note}",
            err=True,
        )
