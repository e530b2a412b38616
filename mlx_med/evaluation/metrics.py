"""Text-generation metrics as pure functions: the study's LLaMA-Factory set and the standard scores.

``llamafactory``: per sample, BLEU-4 = nltk ``sentence_bleu`` over *characters* with smoothing
method 3; ROUGE-1/2/L = F of ``rouge_chinese.Rouge`` over jieba words joined by spaces (0 when either
side is blank); each ×100 rounded to 4 places, then the mean over samples. This is
``ComputeSimilarity`` in LLaMA-Factory's ``train/sft/metric.py``, computed with the same libraries,
so the numbers mean what the study's numbers mean.

Standard scores beside it: sacreBLEU corpus BLEU (``tokenize="zh"`` for Chinese, ``13a`` otherwise,
with its signature) and rouge-score ROUGE with a CJK-aware tokenizer: rouge-score's default
tokenizer keeps only ``[a-z0-9]`` and so silently scores Chinese as empty text.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any

LLAMAFACTORY_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
CHOICES = ("yes", "no", "maybe")
# CJK ideographs (+ extension A, compatibility), kana and Hangul: scored one character per token.
CJK_CHAR = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
CJK_RE = re.compile(f"[{CJK_CHAR}]")
CJK_SPLIT_RE = re.compile(f"([{CJK_CHAR}])")
CHOICE_RE = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def llamafactory_sample(prediction: str, reference: str) -> dict[str, float]:
    """The study's four scores (×100, rounded to 4 places) for one prediction/reference pair."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary load on first use
    hypothesis = list(jieba.cut(prediction))
    reference_words = list(jieba.cut(reference))
    if not " ".join(hypothesis).split() or not " ".join(reference_words).split():
        rouge = {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l")}
    else:
        scores = Rouge().get_scores(" ".join(hypothesis), " ".join(reference_words))[0]
        rouge = {k: v["f"] for k, v in scores.items()}
    with warnings.catch_warnings():  # nltk warns on every zero n-gram overlap
        warnings.simplefilter("ignore")
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **{k: round(v * 100, 4) for k, v in rouge.items()}}


def llamafactory_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of ``llamafactory_sample`` over pairs: the table the study reports (BLEU-4, ROUGE-1/2/L)."""
    _check_pairs(predictions, references)
    if not predictions:
        return {k: 0.0 for k in LLAMAFACTORY_KEYS}
    rows = [llamafactory_sample(p, r) for p, r in zip(predictions, references)]
    return {k: sum(row[k] for row in rows) / len(rows) for k in LLAMAFACTORY_KEYS}


def cjk_ratio(texts: Sequence[str]) -> float:
    """Share of non-space characters that are CJK."""
    chars = sum(len(t) - t.count(" ") for t in texts)
    return sum(len(CJK_RE.findall(t)) for t in texts) / chars if chars else 0.0


def detect_language(texts: Sequence[str], threshold: float = 0.2) -> str:
    """``"zh"`` when at least ``threshold`` of the characters are CJK, else ``"en"``."""
    return "zh" if cjk_ratio(texts) >= threshold else "en"


def sacrebleu_score(predictions: Sequence[str], references: Sequence[str], lang: str = "auto") -> dict[str, Any]:
    """sacreBLEU corpus BLEU: ``tokenize="zh"`` for Chinese, ``13a`` otherwise.

    Returns:
        ``{"bleu": float, "signature": str, "tokenize": str}``; BLEU on sacreBLEU's 0-100 scale.
    """
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    if lang == "auto":
        lang = detect_language(references)
    tokenize = "zh" if lang == "zh" else "13a"
    bleu = BLEU(tokenize=tokenize)
    score = bleu.corpus_score(list(predictions), [list(references)]) if predictions else None
    return {"bleu": score.score if score else 0.0, "signature": str(bleu.get_signature()), "tokenize": tokenize}


class CJKTokenizer:
    """rouge-score tokenizer that keeps CJK text: one token per CJK character.

    Runs of other text go through rouge-score's own tokenizer (lower-case, alphanumerics, optional
    Porter stemming), so on English the tokens are exactly rouge-score's defaults.
    """

    def __init__(self, use_stemmer: bool = True):
        from rouge_score.tokenizers import DefaultTokenizer

        self._default = DefaultTokenizer(use_stemmer=use_stemmer)

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for piece in CJK_SPLIT_RE.split(text):
            if not piece:
                continue
            if CJK_RE.fullmatch(piece):
                tokens.append(piece)
            else:
                tokens.extend(self._default.tokenize(piece))
        return tokens


def rouge_score_scores(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, float]:
    """Mean rouge-score F1 (×100) for ROUGE-1/2/L with ``CJKTokenizer``; keys ``rouge1/rouge2/rougeL``."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(predictions, references)
    types = ("rouge1", "rouge2", "rougeL")
    if not predictions:
        return {k: 0.0 for k in types}
    scorer = RougeScorer(list(types), tokenizer=CJKTokenizer(use_stemmer))
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for k in types:
            totals[k] += scores[k].fmeasure
    return {k: 100 * v / len(predictions) for k, v in totals.items()}


def extract_choice(text: str) -> str | None:
    """The first standalone yes / no / maybe in ``text`` (case-insensitive), or None."""
    match = CHOICE_RE.search(text)
    return match.group(1).lower() if match else None


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and collapse spaces (for exact match)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def choice_accuracy(predictions: Sequence[str], labels: Sequence[str | None]) -> dict[str, Any] | None:
    """Yes/no/maybe accuracy and exact match for rows that carry a label (PubMedQA ``final_decision``).

    Args:
        predictions: model outputs.
        labels: the gold choice per row, None where the row has none.

    Returns:
        None when no row is labelled; else ``accuracy`` (first yes/no/maybe in the output equals
        the label, %), ``exact_match`` (the whole normalised output equals the label, %),
        ``answered`` (% of outputs that state a choice at all), ``n`` (labelled rows) and
        ``confusion`` (``"gold->predicted"`` counts, ``none`` for no choice).
    """
    pairs = [(p, str(g).strip().lower()) for p, g in zip(predictions, labels) if g is not None and str(g).strip()]
    if not pairs:
        return None
    picked = [extract_choice(p) for p, _ in pairs]
    confusion: dict[str, int] = {}
    for (_, gold), choice in zip(pairs, picked):
        key = f"{gold}->{choice or 'none'}"
        confusion[key] = confusion.get(key, 0) + 1
    n = len(pairs)
    return {
        "accuracy": 100 * sum(c == g for c, (_, g) in zip(picked, pairs)) / n,
        "exact_match": 100 * sum(normalize_answer(p) == normalize_answer(g) for p, g in pairs) / n,
        "answered": 100 * sum(c is not None for c in picked) / n,
        "n": n,
        "confusion": dict(sorted(confusion.items())),
    }


def length_stats(predictions: Sequence[str], references: Sequence[str],
                 generation_tokens: Sequence[int] | None = None) -> dict[str, float]:
    """Mean output and reference lengths in characters (and in tokens when given)."""
    n = max(len(predictions), 1)
    out = {
        "mean_output_chars": sum(len(p) for p in predictions) / n,
        "mean_reference_chars": sum(len(r) for r in references) / max(len(references), 1),
        "empty_outputs": sum(not p.strip() for p in predictions),
    }
    if generation_tokens is not None:
        out["mean_output_tokens"] = sum(generation_tokens) / max(len(generation_tokens), 1)
    return out


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str | None] | None = None,
    generation_tokens: Sequence[int] | None = None,
    lang: str = "auto",
) -> dict[str, Any]:
    """Every metric set for one eval: the ``llamafactory`` four at the top level, others by name.

    Returns:
        ``{"bleu-4", "rouge-1", "rouge-2", "rouge-l", "llamafactory": {...}, "sacrebleu": {...},
        "rouge_score": {...}, "lengths": {...}, "choice": {...} (when labelled), "n", "lang"}``.
    """
    _check_pairs(predictions, references)
    lang = detect_language(references) if lang == "auto" else lang
    study = llamafactory_scores(predictions, references)
    metrics: dict[str, Any] = {
        **study,
        "n": len(predictions),
        "lang": lang,
        "llamafactory": dict(study),
        "sacrebleu": sacrebleu_score(predictions, references, lang),
        "rouge_score": rouge_score_scores(predictions, references),
        "lengths": length_stats(predictions, references, generation_tokens),
    }
    choice = choice_accuracy(predictions, labels) if labels is not None else None
    if choice is not None:
        metrics["choice"] = choice
    return metrics


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
