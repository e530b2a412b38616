"""``mlx-med chat`` on a real pseudo-terminal (pexpect): typed messages, slash commands, Ctrl-C, Ctrl-D.

One REPL process runs the whole script (start-up costs a few seconds); every answer on screen is
compared with what an in-process ``ChatSession`` streams for the same model, adapters and settings.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

import mlx_med  # noqa: F401
from mlx_med.chat.session import ChatSession, context_window
from mlx_med.evaluation.decoding import DecodingConfig
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

pexpect = pytest.importorskip("pexpect")
live = pytest.importorskip("mlx_med.adapters.live")

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("pseudo-terminals need a POSIX system", allow_module_level=True)

TIMEOUT = 120  # generous: the machine may be busy; nothing here takes more than a few seconds alone
PROMPT = ">>> "
MAX_NEW = 8
LONG_MESSAGE = "fever"  # at α = 1 the fixture's answer runs on for thousands of tokens (checked below)


@pytest.fixture(scope="module")
def adapter_pair(tiny_llama, tmp_path_factory):
    import json

    from test_chat import random_adapter

    config = json.loads((tiny_llama / "config.json").read_text())
    root = tmp_path_factory.mktemp("pty-adapters")
    return random_adapter(root / "sft", "sft", 10, config), random_adapter(root / "pt", "pt", 11, config)


def expected_answers(tiny_llama, sft, pt):
    """What the REPL should print: streamed pieces of greedy answers at α = 0.5 and α = 1."""
    loaded, adapters = live.load_with_adapters(tiny_llama, sft=sft, pt=pt, alpha=0.5)
    session = ChatSession(loaded.model, loaded.tokenizer, DecodingConfig(max_new_tokens=MAX_NEW),
                          system=DEFAULT_SYSTEM_PROMPT, window=context_window(loaded.config), adapters=adapters)

    def streamed(message):
        pieces = []
        session.ask(message, on_text=pieces.append)
        return "".join(pieces).strip()

    first = streamed("fever")
    session.reset()
    adapters.set_alpha(1.0)
    at_one = streamed("fever")
    # Precondition of the Ctrl-C step: this answer is long (no stop token within 1000 tokens, about a
    # second of streaming), so the interrupt lands while tokens are still coming.
    session.reset()
    session.set_decoding(max_new_tokens=1000)
    assert session.ask(LONG_MESSAGE).stats.finish_reason == "length"
    return first, at_one


def screen_text(child) -> str:
    """What was printed before the last match, without the pty's carriage returns."""
    return child.before.replace("\r", "")


def answer_after(child, message: str) -> str:
    child.sendline(message)
    child.expect_exact(PROMPT)
    text = screen_text(child)
    assert text.startswith(message + "\n"), text  # the terminal echoes the typed line
    return text[len(message) + 1:].split("\n[stopped at")[0].strip()


def command(child, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return screen_text(child)


def test_repl_on_a_pseudo_terminal(tiny_llama, adapter_pair, tmp_path):
    sft, pt = adapter_pair
    first, at_one = expected_answers(tiny_llama, sft, pt)
    assert first != at_one  # the adapters pull the answer apart, so the /alpha check means something

    # one BLAS thread: spinning OpenBLAS threads on a 2-core box would starve this process, and the
    # Ctrl-C below must reach the REPL while it streams
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), TERM="dumb", OPENBLAS_NUM_THREADS="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_med.cli", "chat", "--model", str(tiny_llama), "--sft", str(sft), "--pt", str(pt),
         "--alpha", "0.5", "--temp", "0", "--max-new-tokens", str(MAX_NEW),
         # A window far past the fixture's 512 positions, so that the long answer of the Ctrl-C step is
         # not cut short by the window and is still streaming when the interrupt lands on a busy machine.
         "--context", "65536"],
        env=env, encoding="utf-8", codec_errors="replace", timeout=TIMEOUT, dimensions=(40, 400),
        # A test run started in the background (`cmd &` in a script) ignores SIGINT, and its children
        # inherit that: the REPL on the terminal must get Ctrl-C as a user's would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect_exact(PROMPT)
        banner = screen_text(child)
        assert f"model: {tiny_llama}" in banner and "device: cpu" in banner and "dtype float32" in banner
        assert "α=0.5" in banner and "greedy" in banner

        # A streamed answer, identical to the in-process session's.
        assert answer_after(child, "fever") == first
        assert "conversation: 1 turns" in command(child, "/stats")

        # /reset clears the history: the same question gets the first-turn answer again.
        assert "conversation cleared" in command(child, "/reset")
        assert "conversation: 0 turns" in command(child, "/stats")
        assert answer_after(child, "fever") == first

        # /alpha switches the mix live: the next answer is the α = 1 model's.
        assert "α = 1" in command(child, "/alpha 1")
        command(child, "/reset")
        assert answer_after(child, "fever") == at_one

        # Ctrl-C during a long answer stops it and returns to the prompt; the REPL keeps going.
        command(child, "/max 50000")
        command(child, "/reset")
        child.sendline(LONG_MESSAGE)
        child.expect(LONG_MESSAGE + r"\r\n.")  # the first answer characters are on screen
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)
        stats = command(child, "/stats")
        assert "finish: interrupted" in stats and "conversation: 1 turns" in stats
        command(child, f"/max {MAX_NEW}")
        command(child, "/reset")
        assert answer_after(child, "fever") == at_one

        # Line editing: Ctrl-P recalls the previous line (readline history), Enter runs it again.
        child.send("\x10\r")
        child.expect_exact(PROMPT)
        assert screen_text(child).startswith("fever\n")
        assert "conversation: 2 turns" in command(child, "/stats")

        # Ctrl-C while typing abandons the line, not the program; Ctrl-D quits cleanly.
        child.send("half a question")
        child.expect_exact("half a question")  # on screen, as a person would see it before pressing Ctrl-C
        child.sendintr()
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    history = tmp_path / "state" / "mlx-med" / "chat_history"
    assert "fever" in history.read_text()
