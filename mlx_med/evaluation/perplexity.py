"""Perplexity of held-out text: knowledge retention after training (lower = the model still knows it).

Texts are tokenized, joined with the EOS token and cut into non-overlapping blocks; each block
predicts all but its first token. Used by the QA runner (``--ppl-data``) and the α sweep.
"""

from __future__ import annotations

from pathlib import Path

from mlx_med.errors import UserError


def load_ppl_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Raw texts for perplexity: PT records as they are, chat records as their turns joined."""
    from mlx_med.data.readers import iter_examples

    texts = []
    for example in iter_examples(path, kind="any", skip_bad=True):
        texts.append(example.text if example.text is not None
                     else "\n".join(m["content"] for m in example.messages))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise UserError(f"{path}: no usable text for perplexity")
    return texts


def token_nll(model, tokenizer, texts: list[str], block_size: int = 512, batch_size: int = 2,
              progress: bool = False) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens.

    Texts are tokenized, joined with the EOS token and cut into non-overlapping blocks of
    ``block_size + 1`` tokens; each block predicts its last ``block_size`` tokens.
    """
    import mlx.core as mx

    from mlx_med.evaluation.batch_cache import fresh_kv_cache
    from mlx_med.kernels import cross_entropy

    if block_size < 1:
        raise UserError(f"block_size must be >= 1, got {block_size}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += list(tokenizer.encode(text))
        if eos is not None:
            stream.append(eos)
    step = block_size + 1
    blocks = [stream[i:i + step] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    total, count = 0.0, 0
    # equal-length blocks go together; the shorter tail block runs alone
    full = [b for b in blocks if len(b) == step]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[b] for b in blocks if len(b) != step]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(b) - 1 for b in blocks), desc="perplexity", unit="tok", leave=False,
                   dynamic_ncols=True)
    for group in groups:
        batch = mx.array(group)
        # into a fresh KV cache, so the causal attention may take the fused prefill kernel (MLX's bits;
        # 8% of the demo's perplexity); models with other cache kinds run without one
        logits = model(batch[:, :-1], cache=fresh_kv_cache(model)).astype(mx.float32)
        loss = cross_entropy(logits, batch[:, 1:], reduction="sum")
        total += loss.item()
        count += batch.shape[0] * (batch.shape[1] - 1)
        if bar is not None:
            bar.update(batch.shape[0] * (batch.shape[1] - 1))
    if bar is not None:
        bar.close()
    return total, count


def perplexity_stats(model, tokenizer, texts: list[str], block_size: int = 512,
                     progress: bool = False) -> dict[str, float]:
    """``{"perplexity", "nll", "tokens", "texts", "block_size"}`` for metrics.json."""
    import math

    total, count = token_nll(model, tokenizer, texts, block_size, progress=progress)
    if count == 0:
        raise UserError("no tokens to score for perplexity (texts are empty)")
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "texts": len(texts), "block_size": block_size}
