"""Throw bad inputs at every mlx-med command and count tracebacks and lost files.

    .venv/bin/python scripts/fuzz_cli.py            # the whole corpus (a few minutes on 2 CPU cores)
    .venv/bin/python scripts/fuzz_cli.py --quick    # one case per kind

A scratch workspace holds a tiny random model, an adapter, data, a user's notes and a foreign
folder; HOME points at a scratch home with a private file. Each case runs ``python -m mlx_med.cli``
in a fresh process (cwd = the workspace) and is checked for:

* a traceback ("Traceback (most recent call last)" anywhere in its output), and
* lost files: every file that existed before the case must still exist with the same bytes.

The corpus: malformed and hostile files (data, model folders, GGUF, safetensors, PEFT configs),
bad flags (nan, inf, out-of-range numbers), dangerous ``-o`` targets with and without ``--force``
for every command that writes, and killed processes (SIGKILL / SIGTERM mid-training, then resume).
The last line printed is ``N cases, T tracebacks, L files lost``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@dataclass
class Case:
    name: str
    argv: list[str] = field(default_factory=list)
    prepare: Callable[[Path], None] | None = None  # writes the hostile input into the workspace
    run: Callable[[Path, dict], tuple[int, str]] | None = None  # custom driver (killed processes)
    may_change: tuple[str, ...] = ()  # workspace paths the case is allowed to write (its own fresh -o)


def build_workspace(root: Path) -> tuple[Path, Path]:
    """The scratch workspace (cwd of every case) and home folder."""
    import mlx.core as mx
    from random_adapters import make_adapter
    from tiny_models import build_model, build_tokenizer

    work, home = root / "work", root / "home"
    work.mkdir()
    home.mkdir()
    (home / "diary.txt").write_text("private notes")
    tokenizer = build_tokenizer(root / "tokenizer")
    build_model(work / "model", "llama", tokenizer, seed=0)
    make_adapter(work / "model", work / "adapter", phase="sft")
    make_adapter(work / "model", work / "adapter-pt", phase="pt", seed=1)
    (work / "data").mkdir()
    text = "The patient presented with fever, cough and shortness of breath. " * 4
    (work / "data" / "pt.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(12)))
    chat = [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "Rest and fluids."}]
    (work / "data" / "sft.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(12)))
    (work / "data" / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": f"Question {i}?", "response": "Answer."}) + "\n" for i in range(3)))
    (work / "notes.txt").write_text("keep me")
    (work / "foreign").mkdir()
    (work / "foreign" / "thesis.tex").write_text("years of work")
    tensors = {"token_embd.weight": mx.zeros((8, 8)), "blk.0.attn_q.weight": mx.zeros((8, 8))}
    meta = {"general.architecture": "llama", "llama.block_count": mx.array(1, dtype=mx.uint32),
            "llama.embedding_length": mx.array(8, dtype=mx.uint32),
            "llama.feed_forward_length": mx.array(16, dtype=mx.uint32),
            "llama.attention.head_count": mx.array(0, dtype=mx.uint32)}
    mx.save_gguf(str(work / "heads0.gguf"), tensors, meta)
    return work, home


def corpus(quick: bool) -> list[Case]:
    cases: list[Case] = []
    train = ["train", "--model", "model", "--data", "data/pt.jsonl", "--iters", "2", "--max-seq-len", "32",
             "--batch-size", "2"]
    writers = {
        "train": train,
        "fuse": ["fuse", "--model", "model", "--adapter", "adapter"],
        "export": ["export", "model"],
        "merge": ["merge", "--sft", "adapter", "--pt", "adapter-pt", "--alpha", "0.5"],
        "convert": ["convert", "--hf-path", "model"],
        "export-adapter": ["export-adapter", "adapter"],
        "import-adapter": ["import-adapter", "adapter"],
        "eval": ["eval", "--model", "model", "--data", "data/eval.jsonl", "--max-new-tokens", "2"],
        "sweep": ["sweep", "alpha", "--model", "model", "--sft", "adapter", "--pt", "adapter-pt", "--data",
                  "data/eval.jsonl", "--alphas", "0,1", "--max-new-tokens", "2"],
    }
    targets = [".", "~", "data", "foreign", "model", "/"]
    for verb, argv in writers.items():
        for target in targets[:2] if quick else targets:
            for force in ([], ["--force"]) if verb not in ("eval", "sweep") else ([],):
                cases.append(Case(f"{verb} -o {target} {' '.join(force)}".strip(), [*argv, "-o", target, *force]))

    def data_case(name: str, content: bytes, argv_extra=()) -> Case:
        def prepare(work: Path) -> None:
            (work / "bad").mkdir(exist_ok=True)
            (work / "bad" / name).write_bytes(content)

        return Case(f"train on {name}", [*train[:4], f"bad/{name}", *train[5:], "-o", f"out-{name}",
                                          *argv_extra], prepare, may_change=(f"out-{name}",))

    bad_data = [("empty.jsonl", b""), ("junk.jsonl", b"\x00\xff\xfe garbage \x00\n"),
                ("notjson.jsonl", b"{not json\n"), ("wrongkeys.jsonl", b'{"foo": 1}\n' * 5),
                ("textnum.jsonl", b'{"text": 5}\n' * 5), ("nested.jsonl", b'{"messages": "x"}\n' * 5),
                ("deep.jsonl", b"[" * 100000 + b"\n")]
    cases += [data_case(n, c) for n, c in (bad_data[:2] if quick else bad_data)]

    bad_flags = [["--learning-rate", "nan"], ["--learning-rate", "inf"], ["--lora-alpha", "nan"],
                 ["--lora-alpha", "-1"], ["--iters", "-1"], ["--batch-size", "0"], ["--max-seq-len", "1"],
                 ["--lora-rank", "0"], ["--lora-layers", "99"]]
    for flags in bad_flags[:2] if quick else bad_flags:
        cases.append(Case(f"train {' '.join(flags)}", [*train, "-o", "out-flags", *flags], may_change=("out-flags",)))
    decoding = [["--temperature", "nan"], ["--top-p", "2"], ["--repetition-penalty", "nan"], ["--temperature", "inf"]]
    for flags in decoding[:1] if quick else decoding:
        cases.append(Case(f"eval {' '.join(flags)}", [*writers["eval"], "-o", "out-dec", *flags],
                          may_change=("out-dec",)))
    cases.append(Case("fuse --w-sft nan", ["fuse", "--model", "model", "--sft", "adapter", "--pt", "adapter-pt",
                                           "--w-sft", "nan", "--w-pt", "0.5", "-o", "out-w"], may_change=("out-w",)))

    def broken_model(kind: str) -> Callable[[Path], None]:
        def prepare(work: Path) -> None:
            target = work / f"model-{kind}"
            if target.exists():
                return
            shutil.copytree(work / "model", target)
            if kind == "config":
                (target / "config.json").write_text("{broken")
            elif kind == "weights":
                data = (target / "model.safetensors").read_bytes()
                (target / "model.safetensors").write_bytes(data[: len(data) // 3])
            elif kind == "header":
                (target / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
            elif kind == "arch":
                cfg = json.loads((target / "config.json").read_text())
                cfg["model_type"] = "no-such-arch"
                (target / "config.json").write_text(json.dumps(cfg))

        return prepare

    for kind in ("config", "weights", "header", "arch")[: 2 if quick else 4]:
        cases.append(Case(f"eval on model with bad {kind}", ["eval", "--model", f"model-{kind}", "--data",
                                                             "data/eval.jsonl", "-o", f"out-{kind}"],
                          broken_model(kind), may_change=(f"out-{kind}",)))
        cases.append(Case(f"fuse on model with bad {kind}", ["fuse", "--model", f"model-{kind}", "--adapter",
                                                             "adapter", "-o", f"fused-{kind}"],
                          broken_model(kind), may_change=(f"fused-{kind}",)))
    cases.append(Case("convert GGUF head_count=0", ["convert", "--gguf", "heads0.gguf", "-o", "out-gguf"],
                      may_change=("out-gguf",)))

    def junk_gguf(work: Path) -> None:
        (work / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(200))

    cases.append(Case("convert junk GGUF", ["convert", "--gguf", "junk.gguf", "-o", "out-junk"], junk_gguf,
                      may_change=("out-junk",)))

    def hostile_peft(work: Path) -> None:
        subprocess.run([sys.executable, "-m", "mlx_med.cli", "export-adapter", "adapter", "-o", "peft"], cwd=work,
                       capture_output=True, check=True)
        config = json.loads((work / "peft" / "adapter_config.json").read_text())
        config["alpha_pattern"] = {"(a+)+$": 8, "q_proj[": 2}
        (work / "peft" / "adapter_config.json").write_text(json.dumps(config))

    cases.append(Case("import PEFT with hostile alpha_pattern", ["import-adapter", "peft", "-o", "out-peft"],
                      hostile_peft, may_change=("out-peft", "peft")))

    def corrupt_checkpoint(work: Path) -> None:
        subprocess.run([sys.executable, "-m", "mlx_med.cli", *train[:5], "--iters", "4", "--max-seq-len", "32",
                        "--batch-size", "2", "-o", "run-corrupt", "-q"], cwd=work, capture_output=True, check=True)
        for ckpt in (work / "run-corrupt" / "checkpoints").iterdir():
            (ckpt / "adapters.safetensors").write_bytes(b"torn")
        (work / "run-corrupt" / "done.json").unlink()

    cases.append(Case("resume with every checkpoint corrupt", ["train", "--resume", "run-corrupt", "-q"],
                      corrupt_checkpoint, may_change=("run-corrupt",)))
    for sig in (signal.SIGKILL, signal.SIGTERM)[: 1 if quick else 2]:
        cases.append(Case(f"train killed by {sig.name}, then resumed", run=_killed(train, sig),
                          may_change=(f"run-{sig.name}",)))
    cases.append(Case("two trainers on one folder", run=_concurrent(train), may_change=("run-twice",)))
    return cases


def _killed(train: list[str], sig: signal.Signals):
    def run(work: Path, env: dict) -> tuple[int, str]:
        out = work / f"run-{sig.name}"
        argv = [sys.executable, "-m", "mlx_med.cli", *train[:5], "--iters", "100000", "--max-seq-len", "32",
                "--batch-size", "2", "-o", out.name]
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(sig)
        first, _ = proc.communicate(timeout=120)
        resumed = subprocess.run([sys.executable, "-m", "mlx_med.cli", "train", "--resume", out.name, "--iters",
                                  "12", "-q"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
        note = f"\nleftovers after resume: {leftovers}" if leftovers else ""
        code = resumed.returncode if not leftovers else 99
        return code, first + resumed.stdout + resumed.stderr + note

    return run


def _concurrent(train: list[str]):
    def run(work: Path, env: dict) -> tuple[int, str]:
        argv = [sys.executable, "-m", "mlx_med.cli", *train[:5], "--iters", "100000", "--max-seq-len", "32",
                "--batch-size", "2", "-o", "run-twice"]
        first = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (work / "run-twice" / "metrics.jsonl").is_file():
            time.sleep(0.2)
        second = subprocess.run([*argv, "--force"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        refused = "is in use by pid" in second.stderr
        return (2 if refused else 99), out + second.stdout + second.stderr

    return run


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one or two cases per kind")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case's output")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlx-med-fuzz-"))
    try:
        work, home = build_workspace(root)
        env = {**os.environ, "HOME": str(home), "OPENBLAS_NUM_THREADS": "1", "MLX_MED_CACHE": str(root / "cache")}
        cases = corpus(args.quick)
        tracebacks = lost = 0
        for index, case in enumerate(cases, 1):
            if case.prepare is not None:
                case.prepare(work)
            before = snapshot(root)
            start = time.perf_counter()
            if case.run is not None:
                code, output = case.run(work, env)
            else:
                proc = subprocess.run([sys.executable, "-m", "mlx_med.cli", *case.argv], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=600)
                code, output = proc.returncode, proc.stdout + proc.stderr
            allowed = tuple(work / p for p in case.may_change)
            after = snapshot(root)
            gone = [p for p, data in before.items()
                    if not any(p == a or a in p.parents for a in allowed) and after.get(p) != data]
            crashed = "Traceback (most recent call last)" in output or code not in (0, 2, 130)
            tracebacks += crashed
            lost += len(gone)
            verdict = "TRACEBACK" if crashed else ("LOST " + ", ".join(map(str, gone[:3])) if gone else "ok")
            last = output.strip().splitlines()[-1] if output.strip() else ""
            print(f"[{index}/{len(cases)}] {case.name}: exit {code}, {verdict} ({time.perf_counter() - start:.1f}s)"
                  f"  {last[:110]}", flush=True)
            if args.verbose or crashed:
                print("    " + output.strip().replace("\n", "\n    ")[-3000:], flush=True)
            for path in allowed:  # reset what the case may write, so the next one starts clean
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        print(f"{len(cases)} cases, {tracebacks} tracebacks, {lost} files lost")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
