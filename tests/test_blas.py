"""Choosing the BLAS under MLX: the rule (build core vs CPU flags), the child-process safety belt and its
cache, the thread count, the slow-path warning, and the real libraries on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_med import blas
from mlx_med.blas_check import (
    CRASHED,
    OK,
    REFUSED,
    Verdict,
    VerdictCache,
    child_check,
    cpu_flags,
    parse_config,
    query_library,
    rule_verdict,
)

# /proc/cpuinfo flags of an AVX2-only Zen 3 and of an AVX-512 Skylake-SP (abridged).
ZEN3 = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 sha_ni vaes".split())
SKYLAKE_SP = ZEN3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
CMEEL_CONFIG = "OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4"
DEBIAN_CONFIG = "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64"
SELF_SIGILL = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
CPUINFO = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 fma\n"


def test_parse_config_reads_core_threads_and_dynamic_arch():
    cmeel = parse_config(CMEEL_CONFIG, "SKYLAKEX")
    assert (cmeel.core, cmeel.dynamic_arch, cmeel.max_threads) == ("SKYLAKEX", False, 4)
    debian = parse_config(DEBIAN_CONFIG)  # no corename: the config's core token
    assert (debian.core, debian.dynamic_arch, debian.max_threads) == ("ZEN", True, 64)


def test_skylakex_build_is_refused_on_avx2_and_allowed_on_avx512():
    info = parse_config(CMEEL_CONFIG, "SKYLAKEX")
    refused = rule_verdict(info, ZEN3)
    assert refused is not None and refused.status == REFUSED
    assert "avx512f" in refused.reason and "SKYLAKEX" in refused.reason
    assert rule_verdict(info, SKYLAKE_SP) is None


def test_dynamic_arch_is_allowed_and_unknown_single_core_is_not():
    assert rule_verdict(parse_config(DEBIAN_CONFIG, "Zen"), frozenset()) is None
    unknown = rule_verdict(parse_config("OpenBLAS 0.3.30 FUTURECORE MAX_THREADS=8", "FUTURECORE"), SKYLAKE_SP)
    assert unknown is not None and unknown.status == REFUSED


def test_a_forced_coretype_must_fit_the_cpu():
    # OPENBLAS_CORETYPE makes a DYNAMIC_ARCH build run the named kernels whatever the CPU has
    skylakex = parse_config(DEBIAN_CONFIG.replace("Zen", "SkylakeX"), "SkylakeX")
    assert rule_verdict(skylakex, ZEN3) is None  # its own choice: not forced, trusted
    refused = rule_verdict(skylakex, ZEN3, forced_core="SkylakeX")
    assert refused is not None and refused.status == REFUSED
    assert "OPENBLAS_CORETYPE=SkylakeX" in refused.reason and "avx512f" in refused.reason
    assert rule_verdict(skylakex, SKYLAKE_SP, forced_core="SkylakeX") is None
    assert rule_verdict(parse_config(DEBIAN_CONFIG, "Haswell"), ZEN3, forced_core="Haswell") is None


def test_the_verdict_cache_keeps_forced_coretypes_apart(tmp_path, monkeypatch):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    cache = VerdictCache(tmp_path, cpuinfo=CPUINFO)
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    cache.put(lib, Verdict(OK, "fine"))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "SkylakeX")
    assert cache.get(lib) is None  # other kernels: judged again
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert cache.get(lib).status == OK


def test_haswell_build_needs_avx2_and_fma():
    info = parse_config("OpenBLAS 0.3.26 HASWELL MAX_THREADS=128", "Haswell")
    assert rule_verdict(info, ZEN3) is None
    assert rule_verdict(info, frozenset({"sse2", "avx"})).status == REFUSED


def test_cpu_flags_reads_x86_and_arm_cpuinfo():
    assert cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd sve\n") == {"fp", "asimd", "sve"}


def test_child_killed_by_sigill_means_not_used_and_parent_lives():
    verdict = child_check("/nonexistent/libopenblas.so.0", command=SELF_SIGILL)
    assert verdict.status == CRASHED and not verdict.usable
    assert "SIGILL" in verdict.reason


def _fake_library(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"not really a library")
    return path


def test_chooser_skips_a_library_whose_check_crashes_and_caches_the_verdict(tmp_path):
    crashing, good = _fake_library(tmp_path, "crash.so"), _fake_library(tmp_path, "good.so")
    cache = VerdictCache(tmp_path / "cache", cpuinfo=CPUINFO)
    checks: list[str] = []

    def query(path):
        return parse_config(DEBIAN_CONFIG, "Zen")

    def check(path):
        checks.append(path.name)
        if path == crashing:
            return child_check(path, command=SELF_SIGILL)
        return Verdict(OK, "fine")

    candidates = [(blas.SYSTEM, crashing), (blas.CMEEL, good)]
    chosen, considered = blas.choose_library(candidates, ZEN3, cache, query, check)
    assert chosen is not None and chosen[1] == good
    assert considered[0][1].startswith("crashed") and "SIGILL" in considered[0][1]
    assert cache.get(crashing).status == CRASHED
    # next start-up: both verdicts come from the cache, no child runs
    chosen_again, _ = blas.choose_library(candidates, ZEN3, cache, query, check)
    assert chosen_again[1] == good and checks == ["crash.so", "good.so"]


def test_chooser_refuses_skylakex_on_avx2_without_running_it(tmp_path):
    lib = _fake_library(tmp_path, "libopenblas.so.0")
    cache = VerdictCache(tmp_path, cpuinfo=CPUINFO)

    def check(path):
        raise AssertionError("a refused library must never be run")

    chosen, considered = blas.choose_library([(blas.CMEEL, lib)], ZEN3, cache,
                                             lambda p: parse_config(CMEEL_CONFIG, "SKYLAKEX"), check)
    assert chosen is None and considered[0][1].startswith("refused")


def test_cache_follows_xdg_cache_home_and_a_new_cpu_is_checked_again(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_MED_CACHE", raising=False)  # it would take precedence over XDG
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lib = _fake_library(tmp_path, "lib.so")
    VerdictCache(cpuinfo=CPUINFO).put(lib, Verdict(OK, "fine"))
    assert (tmp_path / "xdg" / "mlx-med" / "blas-verdicts.json").is_file()
    assert VerdictCache(cpuinfo=CPUINFO).get(lib).status == OK
    other_cpu = CPUINFO.replace("avx2 fma", "avx2 fma avx512f")
    assert VerdictCache(cpuinfo=other_cpu).get(lib) is None


def test_thread_count_uses_affinity_quota_and_max_threads():
    assert blas.thread_count({}, 16, None, 64)[0] == 16
    assert blas.thread_count({}, 64, None, 4)[0] == 4  # the build's MAX_THREADS
    assert blas.thread_count({}, 64, 2.5, 64)[0] == 2  # cgroup cpu.max 250000 100000
    assert blas.thread_count({}, 8, 0.5, 64)[0] == 1
    assert blas.thread_count({"OPENBLAS_NUM_THREADS": "3"}, 64, None, 64)[0] is None


def test_idle_workers_sleep_at_once_unless_the_environment_says_otherwise():
    assert blas.idle_spin({})[0] == "4"
    value, why = blas.idle_spin({"OPENBLAS_THREAD_TIMEOUT": "28"})
    assert value is None and "OPENBLAS_THREAD_TIMEOUT=28" in why


IDLE_CPU_CODE = """
import time
import mlx_med, mlx_med.blas as b
status = b.preload_blas()
import mlx.core as mx
a = mx.random.normal((768, 768))
for _ in range(3):
    mx.eval(a @ a)
start = time.process_time()
time.sleep(0.3)  # nothing to do: any CPU time now is OpenBLAS's idle workers spinning
print(status.library, status.threads.split()[0], time.process_time() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_openblas_workers_stop_spinning_after_a_matmul_unless_told_to_spin():
    unset = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    def idle_cpu_seconds(**env):
        done = subprocess.run([sys.executable, "-c", IDLE_CPU_CODE], env={**unset, **env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        library, threads, seconds = done.stdout.split()
        if library == "None" or not threads.isdigit() or int(threads) < 2:
            pytest.skip(f"no multi-threaded OpenBLAS under MLX here ({library}, threads {threads})")
        return float(seconds)

    assert idle_cpu_seconds() < 0.05
    # 2**30 cycles (OpenBLAS's maximum) is longer than the 0.3 s sleep: the worker spins through it
    assert idle_cpu_seconds(OPENBLAS_THREAD_TIMEOUT="30") > 0.1


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text("250000 100000\n")
    assert blas.cpu_quota(tmp_path, "0::/job\n") == 2.5
    (tmp_path / "job" / "cpu.max").write_text("max 100000\n")
    assert blas.cpu_quota(tmp_path, "0::/job\n") is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert blas.cpu_quota(v1, "") == 3.0


def test_slow_path_warning_names_the_fix_only_on_linux_cpu_reference_blas():
    slow = blas.BlasStatus(None, "no OpenBLAS found")
    line = blas.slow_blas_warning(slow, linux=True, on_cpu=True)
    assert line.startswith("warning:") and "libopenblas0-pthread" in line and "\n" not in line
    assert blas.slow_blas_warning(slow, linux=True, on_cpu=False) is None  # CUDA
    assert blas.slow_blas_warning(slow, linux=False, on_cpu=True) is None  # macOS
    assert blas.slow_blas_warning(blas.BlasStatus("/x.so", "ok"), linux=True, on_cpu=True) is None


def _run_cli(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "mlx_med.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_long_command_prints_one_warning_line_on_the_reference_blas(tmp_path):
    done = _run_cli(["eval", "--model", str(tmp_path / "missing"), "--data", "x.jsonl", "-o", str(tmp_path / "o")],
                    {"MLX_MED_BLAS": "stock", "XDG_CACHE_HOME": str(tmp_path)}, tmp_path)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: MLX runs on the slow")]
    assert len(warnings) == 1, done.stderr
    assert "apt-get install libopenblas0-pthread" in warnings[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_real_candidates_on_this_machine_get_a_verdict_and_the_chosen_one_runs(tmp_path):
    candidates = blas.candidate_libraries()
    if not candidates:
        pytest.skip("no OpenBLAS installed here")
    cache = VerdictCache(tmp_path)
    chosen, considered = blas.choose_library(candidates, cpu_flags(), cache)
    assert len(considered) >= 1
    if chosen is not None:
        kind, path, verdict = chosen
        assert verdict.usable and verdict.info is not None
        assert query_library(path).config == verdict.info.config


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_preload_in_a_fresh_process_uses_the_cache_dir_and_survives(tmp_path):
    code = ("import mlx_med, mlx_med.blas as b; s = b.preload_blas(); import mlx.core as mx; "
            "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); print(s.library, '|', s.verdict)")
    env = {k: v for k, v in os.environ.items() if k != "MLX_MED_CACHE"}  # it would take precedence over XDG
    done = subprocess.run([sys.executable, "-c", code], env={**env, "XDG_CACHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.returncode != -signal.SIGILL, done.stderr
    if blas.candidate_libraries():
        assert (tmp_path / "mlx-med" / "blas-verdicts.json").is_file()


def test_a_library_that_is_not_openblas_is_skipped_with_a_reason(tmp_path):
    libc = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6", "/usr/lib/libm.so.6",
                             "/lib/aarch64-linux-gnu/libm.so.6") if Path(p).is_file()), None)
    if libc is None:
        pytest.skip("no libm at a known path")
    chosen, considered = blas.choose_library([(blas.SYSTEM, Path(libc))], ZEN3, VerdictCache(tmp_path, cpuinfo=CPUINFO))
    assert chosen is None and "not an OpenBLAS" in considered[0][1]


def test_gemm_reference_keeps_the_higher_of_two_readings(monkeypatch):
    # benchmarks divide by the peak: a low reading in a busy moment must not become the reference
    from mlx_med import backend

    monkeypatch.setattr(backend, "gemm_gflops", lambda n=1024: 90.0)
    assert backend.gemm_reference(140.0) == 140.0
    assert backend.gemm_reference(60.0) == 90.0 and backend.gemm_reference() == 90.0
