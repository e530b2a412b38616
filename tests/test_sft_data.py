import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mlx_med.data.batches import pad_sequences
from mlx_med.data.readers import iter_examples
from mlx_med.data.sft import ChatDataset, EncodedChat, encode_chat, encode_examples, split_chats
from mlx_med.errors import DataError

ONE_TURN = [{"role": "user", "content": "Is aspirin indicated after a stroke?"},
            {"role": "assistant", "content": "Yes, for secondary prevention."}]
TWO_TURNS = [{"role": "system", "content": "You are a careful medical assistant."},
             {"role": "user", "content": "患者发热、咳嗽三天。"},
             {"role": "assistant", "content": "建议您及时到医院就诊。"},
             {"role": "user", "content": "Call emergency services?"},
             {"role": "assistant", "content": "If chest pain spreads to the arm or jaw, yes."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def template_ids(tokenizer, messages, generation_prompt=False):
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def test_single_turn_masks_exactly_the_prompt(tokenizer):
    enc = encode_chat(ONE_TURN, tokenizer)
    full = template_ids(tokenizer, ONE_TURN)
    prompt = template_ids(tokenizer, ONE_TURN[:1], generation_prompt=True)
    assert enc.tokens.tolist() == full  # the template's own tokenization
    assert full[: len(prompt)] == prompt
    assert enc.targets.tolist() == [False] * len(prompt) + [True] * (len(full) - len(prompt))


def test_multi_turn_learns_every_assistant_turn_and_nothing_else(tokenizer):
    enc = encode_chat(TWO_TURNS, tokenizer)
    assert enc.tokens.tolist() == template_ids(tokenizer, TWO_TURNS)
    learned = enc.tokens[enc.targets].tolist()
    expected = []
    for turn in (TWO_TURNS[2], TWO_TURNS[4]):
        expected += tokenizer.encode(turn["content"] + "<|im_end|>\n", add_special_tokens=False)
    assert learned == expected
    # Prompt tokens: the masked ids are exactly the template's prompt parts.
    first_prompt = template_ids(tokenizer, TWO_TURNS[:2], generation_prompt=True)
    assert enc.tokens[: len(first_prompt)].tolist() == first_prompt and not enc.targets[: len(first_prompt)].any()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero(enc.tokens == im_end)
    assert enc.targets[ends].tolist() == [False, False, True, False, True]  # system, user, asst, user, asst


def test_system_prompt_is_added_only_when_missing(tokenizer):
    with_sys = encode_chat(ONE_TURN, tokenizer, system_prompt="Answer briefly.")
    expected = template_ids(tokenizer, [{"role": "system", "content": "Answer briefly."}, *ONE_TURN])
    assert with_sys.tokens.tolist() == expected
    kept = encode_chat(TWO_TURNS, tokenizer, system_prompt="Answer briefly.")
    assert kept.tokens.tolist() == template_ids(tokenizer, TWO_TURNS)


def test_overlong_policy_truncates_or_drops_with_counts(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    long_answer = "Diabetes mellitus requires regular monitoring of blood glucose. " * 20
    rows = [{"messages": ONE_TURN}, {"messages": [ONE_TURN[0], {"role": "assistant", "content": long_answer}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(path, kind="chat")
    limit = len(encode_chat(ONE_TURN, tokenizer).tokens) + 4
    kept, report = encode_examples(examples, tokenizer, limit, "truncate")
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 0)
    assert len(kept[1].tokens) == limit + 1 and kept[1].targets[-1]
    kept, report = encode_examples(examples, tokenizer, limit, "drop")
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 1) and "1 dropped" in report.summary(limit)
    # A conversation whose answer starts past the limit is dropped even when truncating.
    prompt_len = len(template_ids(tokenizer, ONE_TURN[:1], generation_prompt=True))
    kept, report = encode_examples(examples, tokenizer, prompt_len - 2, "truncate")
    assert report.kept == 0 and report.dropped == 2


def test_pt_record_in_sft_data_is_a_clear_error(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": ONE_TURN}) + "\n" + json.dumps({"text": "raw"}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:2: field 'text': this is a raw-text"):
        load_examples(path, kind="chat")


def test_length_buckets_cut_padding_and_cover_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=256)
    chats = [EncodedChat(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in lengths]
    ds = ChatDataset(chats, seed=1)
    batches = ds.epoch_batches(0, 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(256))

    def padding(bs):
        return sum(int(lengths[b].max() - lengths[b].min()) for b in bs)

    shuffled = np.random.default_rng(2).permutation(256)
    assert padding(batches) < padding([shuffled[i : i + 8] for i in range(0, 256, 8)]) / 3
    assert [b.tolist() for b in ds.epoch_batches(1, 8)] != [b.tolist() for b in batches]


def test_padding_is_masked():
    a = EncodedChat(np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1], bool))
    b = EncodedChat(np.array([5, 6], np.int32), np.array([0, 1], bool))
    batch = pad_sequences([a.tokens, b.tokens], [a.targets.astype(np.float32), b.targets.astype(np.float32)])
    assert batch.inputs.shape[1] % 8 == 0
    assert batch.inputs[0, :3].tolist() == [1, 2, 3] and batch.targets[0, :3].tolist() == [2, 3, 4]
    assert batch.mask[0].tolist()[:4] == [0, 1, 1, 0] and batch.mask[1].tolist()[:2] == [1, 0]
    assert batch.tokens == 3


def test_split_chats_is_disjoint_and_seeded():
    chats = [EncodedChat(np.full(3, i, np.int32), np.ones(3, bool)) for i in range(20)]
    train, val = split_chats(chats, 0.1, seed=0)
    ids = sorted(int(c.tokens[0]) for c in train + val)
    assert ids == list(range(20)) and len(val) == 2
    assert [int(c.tokens[0]) for c in split_chats(chats, 0.1, seed=0)[1]] == [int(c.tokens[0]) for c in val]


def test_real_qwen_template_masks_prompts(qwen_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    enc = encode_chat(TWO_TURNS, tok)
    assert enc.tokens.tolist() == template_ids(tok, TWO_TURNS)
    learned = tok.decode(enc.tokens[enc.targets].tolist())
    assert "建议您及时到医院就诊。" in learned and "If chest pain spreads" in learned
    assert "Call emergency services?" not in learned and "careful medical assistant" not in learned


def load_examples(path, kind="any", skip_bad=False, report=None) -> list:
    return list(iter_examples(path, kind, skip_bad, report))
