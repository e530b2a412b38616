"""Metrics: the llamafactory set against a direct computation of LLaMA-Factory's formula, and the
standard scores against their libraries."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_med.evaluation import metrics

# (prediction, reference): the pairs where a re-implementation would drift.
TRICKY = [
    ("", "患者发热三天，伴有咳嗽。"),               # empty prediction
    ("患者发热", ""),                               # empty reference
    ("   ", "yes"),                                 # whitespace-only prediction
    ("发", "发热"),                                 # one character
    ("a", "b"),                                     # no overlap, single letters
    ("高血压患者应低盐饮食。", "糖尿病需要监测血糖"),  # no overlap, Chinese
    ("Yes, aspirin is indicated after ischemic stroke.", "yes. Aspirin is indicated after a stroke"),  # English
    ("建议您use aspirin每日100mg，并monitor BP。", "建议use aspirin 100mg每日，monitor血压"),          # mixed zh/en
    ("！！？。", "。。，"),                           # punctuation only
    ("。", "。"),                                   # identical punctuation
    ("您好，根据您的描述，建议您及时到医院就诊。", "您好，根据您的描述，建议您及时到医院就诊。"),  # identical
    ("如果胸痛持续不缓解，请立即拨打120急救电话。" * 3, "胸痛请拨打120"),  # long vs short
]


def reference_formula(preds, labels):
    """LLaMA-Factory ComputeSimilarity, written out directly from its source."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


@pytest.mark.parametrize("pair", TRICKY, ids=range(len(TRICKY)))
def test_llamafactory_matches_reference_per_pair(pair):
    ours = metrics.llamafactory_scores([pair[0]], [pair[1]])
    ref = reference_formula([pair[0]], [pair[1]])
    for key in metrics.LLAMAFACTORY_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-4), key


def test_llamafactory_matches_reference_on_the_whole_set():
    preds, labels = zip(*TRICKY)
    ours = metrics.llamafactory_scores(preds, labels)
    ref = reference_formula(preds, labels)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-4)
    # the set is not degenerate: some pairs score, some do not
    assert 0 < ours["bleu-4"] < 100 and 0 < ours["rouge-l"] < 100


def test_llamafactory_edge_values():
    assert metrics.llamafactory_sample("", "发热") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    same = metrics.llamafactory_sample("您好，建议您及时就诊。", "您好，建议您及时就诊。")
    assert same["bleu-4"] == pytest.approx(100.0) and same["rouge-1"] == pytest.approx(100.0, abs=1e-4)
    assert metrics.llamafactory_scores([], []) == dict.fromkeys(metrics.LLAMAFACTORY_KEYS, 0.0)
    with pytest.raises(ValueError):
        metrics.llamafactory_scores(["a"], [])


def test_sacrebleu_picks_tokenizer_and_matches_library():
    import sacrebleu

    zh_pred, zh_ref = ["患者发热三天，伴有咳嗽。"], ["患者发热两天，伴有咳嗽和气短。"]
    zh = metrics.sacrebleu_score(zh_pred, zh_ref)
    assert zh["tokenize"] == "zh" and "tok:zh" in zh["signature"]
    assert zh["bleu"] == pytest.approx(sacrebleu.corpus_bleu(zh_pred, [zh_ref], tokenize="zh").score)
    assert zh["bleu"] > 0
    en_pred, en_ref = ["Aspirin is indicated after a stroke."], ["Aspirin is recommended after a stroke."]
    en = metrics.sacrebleu_score(en_pred, en_ref)
    assert en["tokenize"] == "13a" and "tok:13a" in en["signature"]
    assert en["bleu"] == pytest.approx(sacrebleu.corpus_bleu(en_pred, [en_ref]).score)


def test_rouge_score_keeps_chinese_and_equals_default_on_english():
    from rouge_score.rouge_scorer import RougeScorer

    # the trap: rouge-score's default tokenizer scores Chinese as empty
    default = RougeScorer(["rouge1"]).score("患者发热三天", "患者发热两天")["rouge1"].fmeasure
    assert default == 0.0
    ours = metrics.rouge_score_scores(["患者发热两天"], ["患者发热三天"])
    assert ours["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 of 6 characters shared
    assert metrics.CJKTokenizer().tokenize("建议use aspirin每日") == ["建", "议", "use", "aspirin", "每", "日"]

    pred, ref = "Patients were treated with aspirin daily.", "The patients are treated with daily aspirin."
    expected = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    got = metrics.rouge_score_scores([pred], [ref])
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(100 * expected[key].fmeasure)


def test_choice_accuracy_and_exact_match():
    preds = ["Yes, it does.", "No.", "The evidence is unclear; maybe.", "It depends on the dose.", "yes"]
    labels = ["yes", "yes", "maybe", "no", None]
    acc = metrics.choice_accuracy(preds, labels)
    assert acc["n"] == 4
    assert acc["accuracy"] == pytest.approx(50.0)  # rows 0 and 2
    assert acc["exact_match"] == pytest.approx(0.0)  # none is just the word
    assert acc["answered"] == pytest.approx(75.0)
    assert acc["confusion"]["no->none"] == 1 and acc["confusion"]["yes->no"] == 1
    assert metrics.choice_accuracy(["yes"], ["Yes"])["exact_match"] == 100.0
    assert metrics.choice_accuracy(preds, [None] * 5) is None
    assert metrics.extract_choice("Knowledge is key") is None  # "no" inside a word does not count


def test_compute_metrics_layout():
    preds = ["患者发热三天。", "Yes, aspirin helps."]
    refs = ["患者发热两天。", "Aspirin helps after a stroke."]
    out = metrics.compute_metrics(preds, refs, labels=[None, "yes"], generation_tokens=[5, 7])
    for key in metrics.LLAMAFACTORY_KEYS:
        assert out[key] == out["llamafactory"][key]
    assert out["n"] == 2 and out["choice"]["accuracy"] == 100.0
    assert out["lengths"]["mean_output_tokens"] == 6.0
    assert {"bleu", "signature"} <= set(out["sacrebleu"]) and "rougeL" in out["rouge_score"]
    assert metrics.detect_language(["hello there"]) == "en" and metrics.detect_language(["建议use aspirin每日"]) == "zh"
