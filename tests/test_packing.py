import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mlx_med.data.batches import BatchSchedule
from mlx_med.data.packing import PackedDataset, TokenStream, load_token_stream
from mlx_med.errors import DataError, UserError

DOCS = [
    "The patient presented with fever, cough and shortness of breath for three days.",
    "Hypertension is treated with lifestyle changes and antihypertensive drugs.",
    "高血压患者应低盐饮食，规律服用降压药。",
    "Do not exceed the maximum daily dose of paracetamol.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_stream_is_documents_each_followed_by_one_eos(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "pt.jsonl", [{"text": d} for d in DOCS])
    stream = load_token_stream(data, tokenizer, tmp_path / "cache")
    expected = []
    for doc in DOCS:
        expected += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    assert stream.tokens.tolist() == expected
    assert stream.documents == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert stream.document(i).tolist() == tokenizer.encode(doc) + [tokenizer.eos_token_id]
    assert (stream.tokens == tokenizer.eos_token_id).sum() == len(DOCS)


def test_packing_has_no_padding_and_every_token_is_a_target_once(tmp_path, tokenizer):
    stream = load_token_stream(write_jsonl(tmp_path / "pt.jsonl", [{"text": d} for d in DOCS]),
                               tokenizer, tmp_path / "cache")
    block = 16
    ds = PackedDataset(stream, block)
    n = len(stream.tokens)
    assert len(ds) == (n - 1) // block
    assert ds.dropped_tokens == n - 1 - len(ds) * block < block
    batch = ds.collate(np.arange(len(ds)))
    assert batch.inputs.shape == (len(ds), block)
    assert batch.mask.min() == 1.0  # no padding anywhere
    assert batch.tokens == len(ds) * block
    np.testing.assert_array_equal(batch.targets.reshape(-1), stream.tokens[1 : 1 + len(ds) * block])
    np.testing.assert_array_equal(batch.inputs.reshape(-1), stream.tokens[: len(ds) * block])
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])  # shifted by one
    # EOS stays where the documents end: targets equal to EOS sit exactly at document ends.
    ends = {int(s) - 1 for s in stream.starts[1:]} | {n - 1}
    eos_targets = {int(i) + 1 for i in np.flatnonzero(batch.targets.reshape(-1) == tokenizer.eos_token_id)}
    assert eos_targets <= ends


def test_validation_keeps_the_tail_window_masked(tmp_path, tokenizer):
    stream = load_token_stream(write_jsonl(tmp_path / "v.jsonl", [{"text": DOCS[0]}]), tokenizer, tmp_path / "c")
    block = 16
    ds = PackedDataset(stream, block, keep_tail=True)
    assert ds.target_tokens == len(stream.tokens) - 1
    batch = ds.collate(np.arange(len(ds)))
    assert batch.tokens == len(stream.tokens) - 1
    tail = (len(stream.tokens) - 1) % block or block
    assert batch.mask[-1].sum() == tail and batch.mask[:-1].min() == 1.0


def test_cache_is_used_and_invalidated_by_content(tmp_path, tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "pt.jsonl", [{"text": d} for d in DOCS])
    cache = tmp_path / "cache"
    first = load_token_stream(data, tokenizer, cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tokenizer, "encode", refuse)
    again = load_token_stream(data, tokenizer, cache)
    np.testing.assert_array_equal(again.tokens, first.tokens)
    write_jsonl(data, [{"text": d} for d in DOCS[:2]])  # new content, new key
    with pytest.raises(AssertionError, match="tokenized again"):
        load_token_stream(data, tokenizer, cache)


def test_txt_files_and_directories(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (folder / "b.txt").write_text(DOCS[2], encoding="utf-8")
    stream = load_token_stream(folder, tokenizer, tmp_path / "cache")
    assert stream.documents == 2
    assert stream.document(1).tolist() == tokenizer.encode(DOCS[2]) + [tokenizer.eos_token_id]


def test_bad_pt_data_names_file_line_and_field(tmp_path, tokenizer):
    data = tmp_path / "pt.jsonl"
    data.write_text(json.dumps({"text": DOCS[0]}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"pt.jsonl:2: field 'text': empty"):
        load_token_stream(data, tokenizer, tmp_path / "cache")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*PT data needs raw text"):
        load_token_stream(chat, tokenizer, tmp_path / "cache")
    with pytest.raises(UserError, match="data path not found"):
        load_token_stream(tmp_path / "missing.jsonl", tokenizer, tmp_path / "cache")
    stream = load_token_stream(data, tokenizer, tmp_path / "cache2", skip_bad=True)
    assert stream.documents == 1 and stream.skipped == 1


def test_split_holds_out_whole_documents():
    docs = [np.full(i + 3, i, np.int32) for i in range(10)]
    stream = TokenStream(np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs[:-1]]))
    train, val = stream.split(0.2, seed=0)
    assert train.documents == 8 and val.documents == 2
    seen = sorted({int(train.document(i)[0]) for i in range(8)} | {int(val.document(i)[0]) for i in range(2)})
    assert seen == list(range(10))  # every document once, none cut in two
    assert len(train.tokens) + len(val.tokens) == len(stream.tokens)


def test_epochs_reshuffle_deterministically_and_ranks_share_global_batches():
    stream = TokenStream(np.arange(401, dtype=np.int32), np.array([0]))
    ds = PackedDataset(stream, block_size=4, seed=3)  # 100 windows
    e0, e1 = ds.epoch_batches(0, 8), ds.epoch_batches(1, 8)
    assert len(e0) == 12 and all(len(b) == 8 for b in e0)
    assert [b.tolist() for b in e0] == [b.tolist() for b in ds.epoch_batches(0, 8)]
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    single = BatchSchedule(ds, batch_size=4, rank=0, world=1)
    ranks = [BatchSchedule(ds, batch_size=2, rank=r, world=2) for r in range(2)]
    for k in (0, 5, 30):  # 30 wraps into the second epoch (25 batches of 4 per epoch)
        whole = single.micro_batch(k).inputs
        parts = np.concatenate([s.micro_batch(k).inputs for s in ranks])
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, parts.tolist()))
    assert single.position(30) == (1, 5)
