"""MLX model folder → one GGUF file for llama.cpp, Ollama and LM Studio (ggml's ``gguf`` writer).

The file is what llama.cpp's own ``convert_hf_to_gguf.py`` writes for the same weights: tensors renamed
with the shared map (``convert.gguf_names``), llama Q/K rows permuted the llama.cpp way (qwen2/qwen3 keep
their order and q/k/v biases), no ``output`` tensor when the embeddings are tied, norms and biases in
F32 and the matrices in the outtype (F32, F16, BF16, or Q8_0 through the package's quantizer), the
``<arch>.*`` hyperparameters, and a byte-level BPE tokenizer (``tokenizer.ggml.*``: tokens, types,
merges, the pre-tokenizer name llama.cpp uses to split text, special ids, chat template).

Quantized MLX folders are dequantized first, in fp32, with the project's dequantization rule
(``backend.prepare_for_compute``); fused folders are written as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_med.convert.files import read_json
from mlx_med.convert.gguf_names import ARCHITECTURES, gguf_name, permute_rows, qk_heads

from mlx_med.errors import UserError
from mlx_med.hf_config import normalize_for_mlx

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp recognises a BPE pre-tokenizer by the sha256 of the ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the name decides how llama.cpp splits text before BPE.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
    '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
    '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
    '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
# The hashes of the llama/qwen families, as listed in llama.cpp's convert_hf_to_gguf.
KNOWN_PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFExport:
    """What ``export_gguf`` wrote."""

    path: Path
    architecture: str
    outtype: str
    tensors: int
    total_bytes: int
    dequantized_layers: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"wrote {self.path} (GGUF {self.architecture}, {self.tensors} tensors, {self.outtype}, "
                 f"{self.total_bytes / 1e6:.1f} MB)"]
        if self.dequantized_layers:
            lines.append(f"source was quantized: {self.dequantized_layers} layers dequantized in fp32 first")
        return lines + self.notes


@contextlib.contextmanager
def atomic_output_file(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temp path beside ``out`` that replaces it on success; an existing ``out`` needs ``force``."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def tensor_type(name: str, array: np.ndarray, outtype: str) -> Any:
    """convert_hf_to_gguf's rule: vectors and norms stay F32, matrices take the outtype."""
    import gguf

    if array.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]


def add_tensor(writer: Any, name: str, array: np.ndarray, qtype: Any) -> int:
    """Quantize ``array`` (fp32) to ``qtype`` with gguf's quantizers and add it; F16 when a row does not
    divide into Q8_0 blocks (llama.cpp's converter falls back the same way). Returns the bytes written."""
    import gguf

    try:
        data = gguf.quants.quantize(array, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    return data.nbytes


def file_type(outtype: str) -> Any:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r} (K-quants such as "
                        "Q4_K_M: run llama.cpp's llama-quantize on the f16 GGUF)")


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", force: bool = False) -> GGUFExport:
    """Write the MLX model in ``model_dir`` as one GGUF file.

    Args:
        model_dir: an MLX folder (``mlx-med convert`` / ``fuse`` output, quantized or not).
        out_path: the ``.gguf`` file to create (written beside it and renamed at the end).
        outtype: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0`` for the matrices.
        force: replace an existing file.

    Returns:
        A ``GGUFExport`` describing the file.

    Raises:
        UserError: unsupported architecture, RoPE scaling or tokenizer, bad outtype, existing output.
    """
    import gguf

    from mlx_med.backend import Backend, prepare_for_compute
    from mlx_med.models import load_model

    check_outtype(outtype)
    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.exists() and not force:
        raise UserError(f"{out_path} already exists; pass --force to replace it")
    loaded = load_model(model_dir, compute=False)
    config = {**loaded.config, **normalize_for_mlx(loaded.config)}
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise UserError(f"{model_dir}: model_type {arch!r} cannot be exported to GGUF (supported: "
                        f"{', '.join(ARCHITECTURES)}); export it with `mlx-med export` and use llama.cpp's "
                        "convert_hf_to_gguf.py")
    _check_rope(config, model_dir)
    quantized = sum(1 for m in loaded.model.modules() if hasattr(m, "scales"))
    # The one dequantization rule: fp32 scales, then mlx-lm's dequantize (what CPU compute uses).
    model = prepare_for_compute(loaded.model, Backend("cpu", "none", mx.float32, False))
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # what llama.cpp's converter reads too
    permute = ARCHITECTURES[arch].permute_qk
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])

    total, count = 0, 0
    with atomic_output_file(out_path, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for hf, value in weights.items():
            name = gguf_name(hf)
            if name is None:
                raise UserError(f"{model_dir}: tensor {hf} has no llama.cpp name for {arch}")
            array = np.array(value.astype(mx.float32), copy=False)
            n = qk_heads(name.rsplit(".", 1)[0], heads, kv_heads) if permute else None
            if n is not None:
                array = permute_rows(array, n)
            total += add_tensor(writer, name, array, tensor_type(name, array, outtype))
            count += 1
        writer.add_type(gguf.GGUFType.MODEL)
        add_general_metadata(writer, model_dir)
        _add_hyperparameters(writer, config, outtype)
        _add_tokenizer(writer, tokenizer, model_dir, config)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFExport(out_path, arch, outtype, count, total, quantized)


def add_general_metadata(writer: Any, model_dir: Path) -> None:
    """``general.*`` (name, size label, model-card fields) the way llama.cpp's converters derive them."""
    import gguf

    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    metadata.set_gguf_meta_model(writer)


def _check_rope(config: dict[str, Any], where: Path) -> None:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise UserError(f"{where}: RoPE scaling {kind!r} is not written to GGUF by mlx-med; export the folder "
                        "with `mlx-med export` and convert it with llama.cpp's convert_hf_to_gguf.py")


def _add_hyperparameters(writer: Any, config: dict[str, Any], outtype: str) -> None:
    """The ``<arch>.*`` keys, in convert_hf_to_gguf's spelling (TextModel + LlamaModel)."""
    writer.add_block_count(config["num_hidden_layers"])
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(file_type(outtype))
    if config["model_type"] == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def pre_tokenizer_name(tokenizer: Any, where: Path) -> str:
    """llama.cpp's name for the tokenizer's text splitting (``tokenizer.ggml.pre``)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    # Other vocabularies: recognise the splitting itself (GPT-2's byte-level regex, Qwen2's split regex).
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        return "qwen2"
    raise UserError(f"{where}: llama.cpp does not know this tokenizer's pre-tokenizer (sha256 {digest[:12]}…); "
                    "export with `mlx-med export` and convert with llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer: Any, tokenizer: Any, model_dir: Path, config: dict[str, Any]) -> None:
    """``tokenizer.ggml.*`` as convert_hf_to_gguf's ``_set_vocab_gpt2`` writes them (byte-level BPE only)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{model_dir}: only byte-level BPE tokenizers (Llama 3, SmolLM, Qwen) are written to GGUF; "
                        "for sentencepiece models export with `mlx-med export` and use llama.cpp's "
                        "convert_hf_to_gguf.py")
    vocab_size = config.get("vocab_size", len(tokenizer.vocab))
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined tokens with sentencepiece spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    if config["model_type"] == "llama":  # LlamaModel.set_vocab records the tokenizer's add_prefix_space
        prefix = read_json(model_dir / "tokenizer_config.json").get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(prefix)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    if config["model_type"] == "llama" and vocab_size == 49152:
        # llama.cpp's LlamaModel.set_vocab: 49152-token llama vocabularies (Granite, SmolLM) add no BOS.
        writer.add_add_bos_token(False)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))
