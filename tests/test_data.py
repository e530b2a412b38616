import json

import pytest

from mlx_med.data.readers import SkipReport, iter_examples
from mlx_med.errors import DataError, UserError


def jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


CHAT = [{"role": "user", "content": "发热怎么办？"}, {"role": "assistant", "content": "多喝水，注意休息。"}]


def test_text_records_and_txt_files(tmp_path):
    path = jsonl(tmp_path, [{"text": "fever is a sign", "id": 1}])
    (tmp_path / "book.txt").write_text("传染病学\n第一章")
    examples = load_examples(tmp_path, kind="text")
    assert [e.text for e in examples] == ["传染病学\n第一章", "fever is a sign"]
    assert examples[1].meta == {"id": 1} and examples[1].source == f"{path}:1"


def test_messages(tmp_path):
    [ex] = load_examples(jsonl(tmp_path, [{"messages": CHAT, "final_decision": "yes"}]), kind="chat")
    assert list(ex.messages) == CHAT and ex.meta == {"final_decision": "yes"} and ex.is_chat


def test_sharegpt(tmp_path):
    row = {"conversations": [{"from": "human", "value": "发热怎么办？"}, {"from": "gpt", "value": "多喝水，注意休息。"}],
           "system": "You are a medical assistant."}
    [ex] = load_examples(jsonl(tmp_path, [row]))
    assert list(ex.messages) == [{"role": "system", "content": "You are a medical assistant."}, *CHAT]


def test_alpaca_with_input_and_history(tmp_path):
    row = {"instruction": "Answer", "input": "Is fever dangerous?", "output": "Sometimes.",
           "history": [["hi", "hello"]]}
    [ex] = load_examples(jsonl(tmp_path, [row]))
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert ex.messages[2]["content"] == "Answer\n\nIs fever dangerous?"


@pytest.mark.parametrize("key", ["completion", "response", "output", "label"])
def test_prompt_completion(tmp_path, key):
    [ex] = load_examples(jsonl(tmp_path, [{"prompt": "Q?", key: "A."}]))
    assert list(ex.messages) == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e.text for e in load_examples(path)] == ["a", "b"]


def test_hf_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "ds"))
    assert [e.text for e in load_examples(tmp_path / "ds", kind="text")] == ["one", "two"]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"text": "ok"', ":2: invalid JSON (Expecting ',' delimiter at column 14)"),
        ({"messages": []}, ":2: field 'messages': empty"),
        ({"messages": [{"role": "user"}]}, ":2: field 'messages[0].content': missing"),
        ({"messages": [{"role": "doctor", "content": "x"}]}, ":2: field 'messages[0].role': unknown role 'doctor'"),
        ({"messages": [{"role": "user", "content": 5}]}, ":2: field 'messages[0].content': expected a string, got int"),
        ({"messages": [{"role": "user", "content": "hi"}]}, ":2: field 'messages': no assistant turn"),
        ({"text": ""}, ":2: field 'text': empty"),
        ({"text": ["a"]}, ":2: field 'text': expected a string, got list"),
        ({"prompt": "q"}, ":2: field 'completion': missing"),
        ({"instruction": "q", "output": "   "}, ":2: field 'output': empty"),
        ({"question": "q"}, ":2: unrecognised record: expected 'text', 'messages'"),
        ([1, 2], ":2: expected a JSON object, got list"),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, row, message):
    path = jsonl(tmp_path, [{"messages": CHAT}, row])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 0xff at column 11\)"):
        load_examples(path)


def test_kind_mismatch(tmp_path):
    with pytest.raises(DataError, match="PT data needs raw text"):
        load_examples(jsonl(tmp_path, [{"messages": CHAT}]), kind="text")
    with pytest.raises(DataError, match="this is a raw-text \\(PT\\) record"):
        load_examples(jsonl(tmp_path, [{"text": "x"}], "t.jsonl"), kind="chat")


def test_skip_bad_counts_and_reports(tmp_path):
    path = jsonl(tmp_path, [{"text": "good"}, "not json", {"text": ""}, {"text": "fine"}])
    report = SkipReport()
    examples = load_examples(path, kind="text", skip_bad=True, report=report)
    assert [e.text for e in examples] == ["good", "fine"]
    assert report.skipped == 2
    assert f"{path}:2: invalid JSON" in report.summary() and f"{path}:3: field 'text': empty" in report.summary()


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl, .json, .txt files"):
        load_examples(tmp_path / "empty")


def test_glob_paths(tmp_path):
    jsonl(tmp_path, [{"text": "a"}], "pt_a.jsonl")
    jsonl(tmp_path, [{"text": "b"}], "pt_b.jsonl")
    jsonl(tmp_path, [{"text": "c"}], "other.jsonl")
    assert [e.text for e in load_examples(tmp_path / "pt_*.jsonl")] == ["a", "b"]
    with pytest.raises(UserError, match="no data files match"):
        load_examples(tmp_path / "zz_*.jsonl")


def test_glob_fingerprint_follows_content(tmp_path):
    from mlx_med.fingerprint import path_fingerprint

    jsonl(tmp_path, [{"text": "a"}], "pt_a.jsonl")
    before = path_fingerprint(tmp_path / "pt_*.jsonl")
    jsonl(tmp_path, [{"text": "changed"}], "pt_a.jsonl")
    assert path_fingerprint(tmp_path / "pt_*.jsonl") != before


def load_examples(path, kind="any", skip_bad=False, report=None) -> list:
    return list(iter_examples(path, kind, skip_bad, report))


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_hostile_nesting_is_a_data_error_not_a_crash(tmp_path, name):
    path = tmp_path / name
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(DataError, match="nested too deeply"):
        load_examples(path)
