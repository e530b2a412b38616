"""The chat REPL: slash commands and the two front ends over a ``ChatSession``.

The conversation itself (history, chat template, context window, KV-cache reuse) is the session
engine in ``mlx_med/chat/session.py``; ``handle_command`` applies a slash command to a session;
``run_interactive`` (terminal, readline) and ``run_piped`` (one message per stdin line) are the two
front ends. Loading the model and adapters is the command's job (``mlx_med/commands/chat.py``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from mlx_med.chat.session import ChatSession, Reply, TurnStats
from mlx_med.errors import UserError
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

PROMPT = ">>> "

# -- slash commands ------------------------------------------------------------------------------
HELP = """\
/help           this list
/reset          forget the conversation (system prompt and settings stay)
/system [TEXT]  show or replace the system prompt (/system default restores the default, /system none removes it)
/temp [X]       show or set the temperature (0 = greedy, deterministic)
/top_p [X]      show or set nucleus sampling's top_p (1 = off)
/max [N]        show or set the maximum number of new tokens per answer
/alpha [A]      show or set the SFT weight α of the live adapter mix (needs --sft and --pt)
/save FILE      write the conversation as JSON
/load FILE      replace the conversation with one from a JSON file
/stats          speed of the last answer, prompt tokens, memory, context use
/quit           leave (Ctrl-D works too; Ctrl-C stops an answer)"""


@dataclass
class CommandResult:
    text: str = ""
    quit: bool = False


def handle_command(session: ChatSession, line: str) -> CommandResult:
    """Apply one slash command (``line`` starts with ``/``). Mistakes come back as text, not errors."""
    name, _, arg = line.strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    try:
        return _COMMANDS[name](session, arg) if name in _COMMANDS else CommandResult(
            f"unknown command {name} (/help lists them)")
    except UserError as err:
        return CommandResult(f"error: {err}")


def _number(arg: str, kind: type, what: str):
    try:
        return kind(arg)
    except ValueError:
        raise UserError(f"{what} needs a number, got {arg!r}") from None


def _cmd_system(session: ChatSession, arg: str) -> CommandResult:
    if not arg:
        return CommandResult(f"system prompt: {session.system or '(none)'}")
    session.system = {"default": DEFAULT_SYSTEM_PROMPT, "none": None}.get(arg, arg)
    return CommandResult("system prompt removed" if session.system is None else "system prompt set")


def _cmd_setting(field_name: str, kind: type, what: str):
    def command(session: ChatSession, arg: str) -> CommandResult:
        if arg:
            session.set_decoding(**{field_name: _number(arg, kind, what)})
        return CommandResult(f"{what} = {getattr(session.decoding, field_name):g}")
    return command


def _cmd_alpha(session: ChatSession, arg: str) -> CommandResult:
    if arg:
        session.set_alpha(_number(arg, float, "/alpha"))
    if session.alpha is None:
        return CommandResult("no adapter mix loaded (start with --sft RUN --pt RUN to use /alpha)")
    schedule = getattr(session.adapters, "schedule", None)
    if schedule is not None:
        return CommandResult(f"α = {session.alpha:g} (the default of {schedule.describe()}; its rules stay)")
    return CommandResult(f"α = {session.alpha:g} (ΔW = α·ΔW_sft + (1−α)·ΔW_pt)")


def _cmd_save(session: ChatSession, arg: str) -> CommandResult:
    if not arg:
        return CommandResult("usage: /save FILE")
    return CommandResult(f"saved {len(session.history)} messages to {session.save(arg)}")


def _cmd_load(session: ChatSession, arg: str) -> CommandResult:
    if not arg:
        return CommandResult("usage: /load FILE")
    count = session.load(arg)
    return CommandResult(f"loaded {count} messages and the system prompt from {arg}" if session.system
                         else f"loaded {count} messages from {arg} (no system prompt)")


def _cmd_reset(session: ChatSession, arg: str) -> CommandResult:
    session.reset()
    return CommandResult("conversation cleared")


_COMMANDS: dict[str, Callable[[ChatSession, str], CommandResult]] = {
    "/help": lambda s, a: CommandResult(HELP),
    "/reset": _cmd_reset,
    "/system": _cmd_system,
    "/temp": _cmd_setting("temperature", float, "temperature"),
    "/top_p": _cmd_setting("top_p", float, "top_p"),
    "/max": _cmd_setting("max_new_tokens", int, "max new tokens"),
    "/alpha": _cmd_alpha,
    "/save": _cmd_save,
    "/load": _cmd_load,
    "/stats": lambda s, a: CommandResult(s.stats_text()),
    "/quit": lambda s, a: CommandResult(quit=True),
    "/exit": lambda s, a: CommandResult(quit=True),
}


# -- front ends ----------------------------------------------------------------------------------
def dropped_notice(stats: TurnStats, window: int) -> str:
    turns = "turn" if stats.dropped_turns == 1 else "turns"
    return f"[dropped the {stats.dropped_turns} oldest {turns} to stay within the {window}-token context]"


def run_interactive(session: ChatSession, history_file: Path | None = None) -> None:
    """Read-eval-print loop on a terminal: readline editing, streamed answers, slash commands.

    Ctrl-C stops the answer being generated (or clears the line being typed); Ctrl-D quits.
    """
    loaded = load_line_history(history_file)
    print("Type a message, /help for commands, Ctrl-D to quit.", flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        try:
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                result = handle_command(session, line)
                if result.text:
                    print(result.text)
                if result.quit:
                    break
                continue
            reply = session.ask(line, on_text=_write)
            print(flush=True)
            if reply.stats.finish_reason == "length":
                print(length_notice(reply.stats, session))
            if reply.stats.dropped_turns:
                print(dropped_notice(reply.stats, session.window))
        except KeyboardInterrupt:
            print("\n[stopped]", flush=True)
        except UserError as err:
            print(f"error: {err}", flush=True)
    save_line_history(history_file, loaded)


def run_piped(session: ChatSession, lines: Iterable[str], out: TextIO, err: TextIO,
              as_json: bool = False, keep_history: bool = True) -> None:
    """One answer per input line, for scripts: plain (newlines escaped as ``\\n``) or JSON lines.

    Lines starting with ``/`` are slash commands: they print their result on ``err`` and nothing
    on ``out``. An empty line gets an empty answer, so output line N answers input line N.
    """
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.lstrip().startswith("/"):
            result = handle_command(session, line)
            if result.text:
                err.write(result.text + "\n")
                err.flush()
            if result.quit:
                break
            continue
        if not keep_history:
            session.reset()
        reply, error = Reply(""), None
        if line.strip():
            try:
                reply = session.ask(line)
            except UserError as exc:
                error = str(exc)
                err.write(f"error: {exc}\n")
            if reply.stats.dropped_turns:
                err.write(dropped_notice(reply.stats, session.window) + "\n")
        if as_json:
            record = {"input": line, "answer": reply.text, **asdict(reply.stats)}
            if error:
                record["error"] = error
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write(escape_line(reply.text) + "\n")
        out.flush()


def escape_line(text: str) -> str:
    """``text`` on one line: backslash, newline and carriage return written as ``\\\\``, ``\\n``, ``\\r``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def length_notice(stats: TurnStats, session: ChatSession) -> str:
    """Why an answer stopped at its token limit, and what raises it."""
    if stats.token_limit < session.decoding.max_new_tokens:
        return (f"[stopped at {stats.token_limit} new tokens: the {session.window}-token context window is full; "
                "/reset starts a new conversation]")
    return f"[stopped at {stats.token_limit} new tokens; /max N raises the limit]"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def load_line_history(history_file: Path | None) -> int:
    """Turn on readline editing and load earlier sessions' lines; returns how many were loaded."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and ↑/↓ history)
    except ImportError:  # Windows without pyreadline: plain input() still works
        return 0
    if history_file is not None and history_file.is_file():
        try:
            readline.read_history_file(str(history_file))
        except OSError:
            pass
    return readline.get_current_history_length()


def save_line_history(history_file: Path | None, loaded: int = 0, keep: int = 1000) -> None:
    """Append this session's typed lines to ``history_file`` (mode 0600: they can be medical questions).

    Lines are appended under an exclusive lock, not written over the file, so two chat sessions
    ending in any order both keep their lines. ``loaded`` is what ``load_line_history`` returned.
    """
    if history_file is None:
        return
    try:
        import fcntl
        import readline

        new = readline.get_current_history_length() - loaded
        if new <= 0:
            return
        history_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(history_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # sessions ending together take turns (a short wait)
            os.fchmod(fd, 0o600)
            readline.append_history_file(new, str(history_file))
            if history_file.stat().st_size > 200 * keep:  # trim now and then: keep the newest lines
                readline.clear_history()
                readline.read_history_file(str(history_file))
                readline.set_history_length(keep)
                readline.write_history_file(str(history_file))
                os.chmod(history_file, 0o600)
        finally:
            os.close(fd)
    except (ImportError, OSError):
        pass
