"""The chat REPL without a terminal: session state, slash commands, piped CLI, live α.

The pseudo-terminal front end is driven in ``tests/test_chat_pty.py``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_med  # noqa: F401
from mlx_med.chat.repl import (
    escape_line,
    handle_command,
    length_notice,
    run_piped,
)
from mlx_med.chat.session import ChatSession, context_window
from mlx_med.cli import cli
from mlx_med.errors import UserError
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.evaluation.generate import encode_chat
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT, DEFAULT_SYSTEM_PROMPT_ZH, system_prompt

GREEDY = DecodingConfig(temperature=0.0, max_new_tokens=8)
QUESTIONS = ["Is aspirin indicated after a stroke?", "高血压患者应该注意什么？", "fever"]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from mlx_med.models import load_model

    return load_model(tiny_llama)


def new_session(loaded, decoding=GREEDY, system=DEFAULT_SYSTEM_PROMPT, window=None, adapters=None):
    window = window or context_window(loaded.config)
    return ChatSession(loaded.model, loaded.tokenizer, decoding, system=system, window=window, adapters=adapters)


def mlx_lm_greedy(loaded, messages, max_tokens):
    """Reference answer: mlx-lm's generate_step on the templated prompt (no cache reuse), decoded
    without special tokens."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_med.evaluation.decoding import make_sampler

    prompt = mx.array(encode_chat(loaded.tokenizer, messages))
    tokens = []
    for token, _ in generate_step(prompt, loaded.model, max_tokens=max_tokens, sampler=make_sampler(GREEDY)):
        if token in loaded.tokenizer.eos_token_ids:
            break
        tokens.append(int(token))
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()


# -- answers and history ---------------------------------------------------------------------
def test_streamed_answer_equals_mlx_lm_and_history_grows(loaded):
    session = new_session(loaded)
    pieces = []
    reply = session.ask(QUESTIONS[0], on_text=pieces.append)
    assert pieces and all(isinstance(p, str) for p in pieces)  # streamed as it was generated
    assert reply.text == mlx_lm_greedy(loaded, session.messages()[:-1], 8)
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == reply.text
    assert reply.stats.prompt_tokens == len(encode_chat(loaded.tokenizer, session.messages()[:2]))
    assert reply.stats.finish_reason in ("stop", "length")
    assert 0 < reply.stats.generation_tokens <= 8


def test_greedy_answer_matches_transformers(tiny_llama, loaded):
    """The peer: transformers' greedy generate on the same folder and chat template."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    session = new_session(loaded, system=None)
    ours = session.ask(QUESTIONS[0]).text
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    assert ours == tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_later_turns_reuse_the_cache_and_answer_as_a_fresh_session(loaded):
    session = new_session(loaded)
    for question in QUESTIONS:
        reply = session.ask(question)
    assert reply.stats.reused_tokens > 0  # the system prompt and earlier turns were not re-read
    # A fresh session given the same history (no cache) must say exactly the same thing.
    fresh = new_session(loaded)
    fresh.history = [dict(m) for m in session.history[:-2]]
    assert fresh.ask(QUESTIONS[-1]).text == reply.text
    assert fresh.last.reused_tokens == 0
    assert reply.text == mlx_lm_greedy(loaded, session.messages()[:-1], 8)


def test_temperature_zero_is_deterministic_and_sampling_differs(loaded):
    a = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=12)).ask("fever").text
    b = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=12)).ask("fever").text
    assert a == b
    import mlx.core as mx

    mx.random.seed(1)
    hot = DecodingConfig(temperature=5.0, top_p=1.0, max_new_tokens=12)
    samples = {new_session(loaded, decoding=hot).ask("fever").text for _ in range(3)}
    assert len(samples) > 1


def test_oldest_turns_dropped_to_fit_the_window(loaded):
    system_tokens = len(encode_chat(loaded.tokenizer, [{"role": "user", "content": "x"}]))
    window = system_tokens + 60  # room for about two short turns plus the answer
    session = new_session(loaded, system=None, window=window)
    dropped = 0
    for i in range(6):
        reply = session.ask(f"{QUESTIONS[i % 3]} {i}")
        dropped += reply.stats.dropped_turns
        assert reply.stats.prompt_tokens + reply.stats.generation_tokens <= window
    assert dropped > 0
    assert session.history[-2]["content"] == f"{QUESTIONS[5 % 3]} 5"  # the newest turn is kept
    fresh = new_session(loaded, system=None, window=window)  # the reused cache prefix was still right
    fresh.history = session.history[:-2]
    assert fresh.ask(f"{QUESTIONS[5 % 3]} 5").text == reply.text
    assert session.history[0]["role"] == "user"


def test_message_longer_than_the_window_is_refused_and_history_untouched(loaded):
    session = new_session(loaded, system=None, window=30)
    session.ask("hi")
    before = list(session.history)
    with pytest.raises(UserError, match="30-token context window"):
        session.ask("fever " * 100)
    assert session.history == before


def test_interrupt_keeps_partial_answer_and_session_recovers(loaded):
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=50))
    seen = []

    def stop_after_three(text):
        seen.append(text)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("fever", on_text=stop_after_three)
    assert session.last.finish_reason == "interrupted"
    assert session.history[-1]["role"] == "assistant" and session.history[-1]["content"]
    assert 3 <= session.last.generation_tokens < 50
    reply = session.ask("cough")  # the cache was dropped: a clean re-read, same as a fresh session
    assert reply.stats.reused_tokens == 0
    fresh = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=50))
    fresh.history = session.history[:-2]
    assert fresh.ask("cough").text == reply.text


# -- slash commands ------------------------------------------------------------------------------
def test_reset_clears_history(loaded):
    session = new_session(loaded)
    first = session.ask("fever").text
    session.ask("cough")
    result = handle_command(session, "/reset")
    assert "cleared" in result.text and session.history == []
    assert session.ask("fever").text == first  # same as the first turn of a new conversation


def test_settings_commands_change_decoding_and_reject_bad_values(loaded):
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.7, top_p=0.9))
    assert handle_command(session, "/temp 0").text == "temperature = 0"
    assert session.decoding.greedy
    assert handle_command(session, "/top_p 0.5").text == "top_p = 0.5"
    assert handle_command(session, "/max 3").text == "max new tokens = 3"
    assert session.decoding.top_p == 0.5 and session.decoding.max_new_tokens == 3
    assert session.ask("fever").stats.generation_tokens <= 3
    assert handle_command(session, "/temp hot").text == "error: temperature needs a number, got 'hot'"  # no crash, no change
    assert handle_command(session, "/top_p 2").text.startswith("error: top_p must be in (0, 1]")
    assert session.decoding.top_p == 0.5
    assert "unknown command /frobnicate" in handle_command(session, "/frobnicate").text
    assert handle_command(session, "/quit").quit and handle_command(session, "/exit").quit
    assert "/alpha" in handle_command(session, "/help").text
    assert "no adapter mix" in handle_command(session, "/alpha").text
    assert handle_command(session, "/alpha 0.3").text.startswith("error: /alpha needs two adapters")


def test_system_command_replaces_prompt_and_changes_the_answer(loaded):
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=12))
    default_answer = session.ask("fever").text
    assert DEFAULT_SYSTEM_PROMPT in handle_command(session, "/system").text
    handle_command(session, "/system You are a terse nurse.")
    assert session.messages()[0] == {"role": "system", "content": "You are a terse nurse."}
    handle_command(session, "/system none")
    assert session.messages()[0]["role"] == "user"
    handle_command(session, "/reset")
    assert session.ask("fever").text == new_session(loaded, system=None, decoding=session.decoding).ask("fever").text
    handle_command(session, "/system default")
    handle_command(session, "/reset")
    assert session.ask("fever").text == default_answer


def test_save_and_load_round_trip(loaded, tmp_path):
    session = new_session(loaded)
    session.ask("fever")
    session.ask("cough")
    path = tmp_path / "conv.json"
    assert "saved 4 messages" in handle_command(session, f"/save {path}").text
    saved = json.loads(path.read_text())
    assert saved["messages"][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert saved["messages"][1:] == session.history
    assert saved["mlx_med"]["decoding"]["temperature"] == 0.0

    other = new_session(loaded, system="something else")
    assert "loaded 4 messages and the system prompt" in handle_command(other, f"/load {path}").text
    assert other.messages() == session.messages()
    assert other.ask("next").text == session.ask("next").text

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))
    result = handle_command(other, f"/load {bad}")
    assert result.text.startswith("error:") and "messages[1].role" in result.text and "robot" in result.text
    assert other.messages()[0]["content"] == DEFAULT_SYSTEM_PROMPT  # unchanged after a failed load
    assert "not found" in handle_command(other, f"/load {tmp_path / 'missing.json'}").text
    (tmp_path / "broken.json").write_text("{not json")
    assert "not valid JSON" in handle_command(other, f"/load {tmp_path / 'broken.json'}").text


def test_stats_report_speed_prompt_and_memory(loaded):
    session = new_session(loaded)
    assert "no answer yet" in handle_command(session, "/stats").text
    session.ask("fever")
    text = handle_command(session, "/stats").text
    assert "tok/s" in text and "memory:" in text
    assert f"prompt: {session.last.prompt_tokens} tokens" in text
    assert "conversation: 1 turns" in text and f"/{session.window} context tokens" in text


# -- piped front end -------------------------------------------------------------------------
def test_escape_line_keeps_one_answer_per_line():
    text = "line one\nline two\r\nback\\slash"
    escaped = escape_line(text)
    assert "\n" not in escaped and "\r" not in escaped
    decoded = escaped.encode().decode("unicode_escape")  # the escaping is reversible
    assert decoded == text


def test_run_piped_lines_commands_and_json(loaded):
    session = new_session(loaded)
    out, err = io.StringIO(), io.StringIO()
    run_piped(session, ["fever\n", "\n", "/temp 0\n", "cough\n"], out, err)
    lines = out.getvalue().split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # fever, empty, cough; the command prints on stderr
    assert lines[1] == ""
    assert "temperature = 0" in err.getvalue()
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["fever", "cough"]

    session = new_session(loaded)
    out = io.StringIO()
    run_piped(session, ["fever\n", "cough\n", "/quit\n", "never\n"], out, err, as_json=True, keep_history=False)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["input"] for r in records] == ["fever", "cough"]
    assert records[1]["answer"] == new_session(loaded).ask("cough").text  # no history: as if asked first
    assert {"prompt_tokens", "generation_tokens", "finish_reason", "dropped_turns"} <= set(records[0])


def test_cli_contract_piped_subprocess(tiny_llama, loaded):
    """``printf 'q1\\nq2\\n' | mlx-med chat --model DIR --max-new-tokens N``: one line per answer, exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_med.cli", "chat", "--model", str(tiny_llama), "--max-new-tokens", "6",
         "--temp", "0"],
        input="question one\nquestion two\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert len(lines) == 3 and lines[2] == ""
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=6))
    assert lines[0] == escape_line(session.ask("question one").text)
    assert lines[1] == escape_line(session.ask("question two").text)
    assert f"model: {tiny_llama}" in proc.stderr and "device: cpu" in proc.stderr and "dtype float32" in proc.stderr


def test_cli_json_system_and_context_flags(tiny_llama, loaded):
    runner = CliRunner()
    result = runner.invoke(cli, ["chat", "--model", str(tiny_llama), "--temp", "0", "--max-new-tokens", "5",
                                 "--system", "Be brief.", "--json", "-q"], input="fever\n")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=5), system="Be brief.")
    assert record["answer"] == session.ask("fever").text
    assert record["prompt_tokens"] == session.last.prompt_tokens
    assert "model:" not in result.stderr  # -q


def test_cli_config_file_and_bad_flags(tiny_llama, tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "chat.yaml"
    cfg.write_text(f"model: {tiny_llama}\ntemperature: 0\nmax_new_tokens: 4\n")
    result = runner.invoke(cli, ["chat", "-c", str(cfg)], input="fever\n")
    assert result.exit_code == 0 and "greedy, max 4 new tokens" in result.stderr
    cfg.write_text("model: x\ntemprature: 0\n")
    result = runner.invoke(cli, ["chat", "-c", str(cfg)], input="")
    assert result.exit_code == 2 and "chat.yaml:2" in result.stderr and "temprature" in result.stderr
    for args, message in [
        (["--sft", "a"], "--sft and --pt go together"),
        (["--adapter", "a", "--sft", "b", "--pt", "c"], "not both"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
    ]:
        result = runner.invoke(cli, ["chat", "--model", str(tiny_llama), *args], input="")
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    result = runner.invoke(cli, ["chat"], input="")
    assert result.exit_code == 2 and "--model DIR is required" in result.stderr


# -- small pieces ----------------------------------------------------------------------------
def test_context_window_and_prompts():
    assert context_window({"max_position_embeddings": 8192}) == 8192
    assert context_window({"max_position_embeddings": 8192}, 1024) == 1024
    assert context_window({}) > 0
    with pytest.raises(UserError):
        context_window({}, 1)
    assert system_prompt("zh") == DEFAULT_SYSTEM_PROMPT_ZH and "120" in DEFAULT_SYSTEM_PROMPT_ZH
    assert "not a doctor" in DEFAULT_SYSTEM_PROMPT and "emergency" in DEFAULT_SYSTEM_PROMPT
    with pytest.raises(UserError, match="fr"):
        system_prompt("fr")


# -- live α (two adapters) -------------------------------------------------------------------
def random_adapter(out_dir: Path, phase: str, seed: int, model_config: dict) -> Path:
    """A rank-4 adapter on q_proj and v_proj of every layer, random A and B (so ΔW is not zero)."""
    import mlx.core as mx

    from mlx_med.adapters.format import Adapter, AdapterMeta, write_adapter

    rng = np.random.default_rng(seed)
    h, d = model_config["hidden_size"], model_config["head_dim"]
    outs = {"self_attn.q_proj": model_config["num_attention_heads"] * d,
            "self_attn.v_proj": model_config["num_key_value_heads"] * d}
    weights = {}
    for layer in range(model_config["num_hidden_layers"]):
        for key, out in outs.items():
            name = f"model.layers.{layer}.{key}"
            weights[f"{name}.lora_a"] = mx.array(rng.standard_normal((h, 4)).astype(np.float32) * 0.5)
            weights[f"{name}.lora_b"] = mx.array(rng.standard_normal((4, out)).astype(np.float32) * 0.5)
    meta = AdapterMeta(phase=phase, lora_alpha=8.0, target_modules=list(outs))
    adapter = Adapter(rank=4, scale=2.0, num_layers=model_config["num_hidden_layers"], keys=list(outs),
                      weights=weights, meta=meta)
    return write_adapter(adapter, out_dir)


@pytest.fixture(scope="module")
def adapter_pair(tiny_llama, tmp_path_factory):
    config = json.loads((tiny_llama / "config.json").read_text())
    root = tmp_path_factory.mktemp("adapters")
    return random_adapter(root / "sft", "sft", 10, config), random_adapter(root / "pt", "pt", 11, config)


def first_logits(session: ChatSession, message: str):
    """The model's next-token logits for ``message`` as a first turn (no generation, no history)."""
    import mlx.core as mx

    ids = encode_chat(session.tokenizer, [{"role": "user", "content": message}], session.system)
    return np.array(session.model(mx.array([ids]))[0, -1].astype(mx.float32))


def test_alpha_switch_changes_logits_like_a_fresh_load(tiny_llama, adapter_pair):
    live = pytest.importorskip("mlx_med.adapters.live")
    sft, pt = adapter_pair
    loaded_live, adapters = live.load_with_adapters(tiny_llama, sft=sft, pt=pt, alpha=0.0)
    session = new_session(loaded_live, adapters=adapters)
    at_zero = first_logits(session, "fever")
    answer_zero = session.ask("fever").text
    assert handle_command(session, "/alpha 1").text.startswith("α = 1")
    assert session.alpha == 1.0
    at_one = first_logits(session, "fever")
    assert np.abs(at_one - at_zero).max() > 1e-2  # the switch reached the weights

    reference, ref_adapters = live.load_with_adapters(tiny_llama, sft=sft, pt=pt, alpha=1.0)
    np.testing.assert_allclose(at_one, first_logits(new_session(reference, adapters=ref_adapters), "fever"),
                               atol=1e-4, rtol=1e-4)
    handle_command(session, "/reset")
    assert handle_command(session, "/alpha 0").text.startswith("α = 0")
    assert session.ask("fever").text == answer_zero


def test_cli_alpha_in_piped_mode_equals_starting_at_that_alpha(tiny_llama, adapter_pair):
    pytest.importorskip("mlx_med.adapters.live")
    sft, pt = adapter_pair
    runner = CliRunner()
    base = ["chat", "--model", str(tiny_llama), "--sft", str(sft), "--pt", str(pt), "--temp", "0",
            "--max-new-tokens", "6", "--no-history"]
    switched = runner.invoke(cli, [*base, "--alpha", "0"], input="fever\n/alpha 1\nfever\n")
    assert switched.exit_code == 0, switched.output
    at_zero, at_one = switched.stdout.split("\n")[:2]
    assert "α=0: sft=0" in switched.stderr and "/alpha A switches live" in switched.stderr
    assert "α = 1" in switched.stderr
    started = runner.invoke(cli, [*base, "--alpha", "1"], input="fever\n")
    assert started.stdout.split("\n")[0] == at_one
    assert at_zero != at_one


def test_huge_max_new_tokens_does_not_wipe_the_history(loaded):
    session = new_session(loaded, decoding=DecodingConfig(temperature=0.0, max_new_tokens=100_000), system=None,
                          window=400)
    session.set_decoding(max_new_tokens=3)
    session.ask("fever")
    session.set_decoding(max_new_tokens=100_000)  # far more than the window: the answer gets what is left
    reply = session.ask("cough")
    assert reply.stats.dropped_turns == 0 and len(session.history) == 4
    assert reply.stats.prompt_tokens + reply.stats.generation_tokens <= 400
    # The random fixture never emits its stop token this early, so both answers end at their limits:
    # the window's room (said so, with the way out) and then --max-new-tokens.
    assert reply.stats.finish_reason == "length" and reply.stats.token_limit == 400 - reply.stats.prompt_tokens
    assert "400-token context window is full" in length_notice(reply.stats, session)
    session.set_decoding(max_new_tokens=2)
    reply = session.ask("fever")
    assert reply.stats.finish_reason == "length" and reply.stats.token_limit == 2
    assert length_notice(reply.stats, session) == "[stopped at 2 new tokens; /max N raises the limit]"


def test_cli_lang_and_system_file(tiny_llama, loaded, tmp_path):
    runner = CliRunner()
    args = ["chat", "--model", str(tiny_llama), "--temp", "0", "--max-new-tokens", "2", "--json", "-q"]
    zh = json.loads(runner.invoke(cli, [*args, "--lang", "zh"], input="发热\n").stdout)
    expected = encode_chat(loaded.tokenizer, [{"role": "user", "content": "发热"}], DEFAULT_SYSTEM_PROMPT_ZH)
    assert zh["prompt_tokens"] == len(expected)
    prompt_file = tmp_path / "system.txt"
    prompt_file.write_text("You are a terse nurse.\n")
    from_file = json.loads(runner.invoke(cli, [*args, "--system", f"@{prompt_file}"], input="fever\n").stdout)
    expected = encode_chat(loaded.tokenizer, [{"role": "user", "content": "fever"}], "You are a terse nurse.")
    assert from_file["prompt_tokens"] == len(expected)
    missing = runner.invoke(cli, [*args, "--system", f"@{tmp_path / 'nope.txt'}"], input="fever\n")
    assert missing.exit_code == 2 and "file not found" in missing.stderr


def test_line_history_is_private_and_two_sessions_merge(tmp_path):
    readline = pytest.importorskip("readline")
    from mlx_med.chat.repl import load_line_history, save_line_history

    path = tmp_path / "state" / "chat_history"
    readline.clear_history()
    loaded = load_line_history(path)
    readline.add_history("first session: fever and cough?")
    save_line_history(path, loaded)  # a session that ends first ...
    assert path.stat().st_mode & 0o777 == 0o600
    readline.clear_history()
    loaded = load_line_history(path)
    readline.add_history("second session: dose of paracetamol?")
    with open(path, "a") as f:  # ... while another one, started earlier, ends in between
        f.write("third session: chest pain\n")
    save_line_history(path, loaded)
    readline.clear_history()
    readline.read_history_file(str(path))
    lines = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
    assert lines == ["first session: fever and cough?", "third session: chest pain",
                     "second session: dose of paracetamol?"]
    assert path.stat().st_mode & 0o777 == 0o600
    readline.clear_history()
