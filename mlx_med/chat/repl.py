"""The chat REPL: a multi-turn conversation with a loaded model, streamed token by token.

``ChatSession`` holds the state (system prompt, history, decoding settings, the live adapter mix)
and answers one message at a time through mlx-lm's ``stream_generate``; ``handle_command`` applies a
slash command to it; ``run_interactive`` (terminal, readline) and ``run_piped`` (one message per
stdin line) are the two front ends. Loading the model and adapters is the command's job
(``mlx_med/commands/chat.py``), not this module's.

Between turns the KV cache is kept and reused for the longest prefix the new prompt shares with
what the cache already holds (the previous prompt and answer), so a long conversation does not
re-read its whole history on every turn. It is dropped whenever the weights change (``/alpha``) or
a turn is interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mlx_med.errors import DataError, UserError
from mlx_med.evaluation.decoding import DecodingConfig, make_logits_processors, make_sampler
from mlx_med.evaluation.generate import encode_chat
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

PROMPT = ">>> "
# Used when config.json names no context length (rare: every HF/GGUF-derived config has one).
FALLBACK_CONTEXT = 4096
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx", "max_seq_len")


@dataclass
class ChatConfig:
    """Settings of ``mlx-med chat`` (YAML keys = these names; flags override them)."""

    model: str | None = None
    adapter: str | None = None  # one adapter or training run directory
    sft: str | None = None  # with pt: two adapters mixed live, ΔW = α·ΔW_sft + (1−α)·ΔW_pt
    pt: str | None = None
    alpha: float | None = None  # None: mlx_med.adapters.mix.DEFAULT_ALPHA (or the schedule's default)
    alpha_schedule: str | None = None  # α per layer range / module type; /alpha moves its default
    system: str | None = None  # None: the default prompt in ``lang``; "@FILE": read from FILE
    lang: str = "en"  # language of the default system prompt (en, zh)
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    context: int | None = None  # tokens; None: the model's own window
    seed: int = 0

    def system_prompt(self) -> str | None:
        """The system prompt these settings ask for (``--system @FILE`` reads FILE)."""
        from mlx_med.prompts import system_prompt

        if self.system is None:
            return system_prompt(self.lang)
        if self.system.startswith("@"):
            path = Path(self.system[1:]).expanduser()
            if not path.is_file():
                raise UserError(f"--system {self.system}: file not found: {path}")
            return path.read_text(encoding="utf-8").strip() or None
        return self.system or None

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens, seed=self.seed,
        )


@dataclass
class TurnStats:
    """Figures of one answer, for ``/stats`` and ``--json``."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served from the KV cache of earlier turns
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "interrupted"
    token_limit: int = 0  # new tokens allowed: max_new_tokens, or less when the context window is nearly full
    dropped_turns: int = 0  # oldest turns removed to fit the context window


@dataclass
class Reply:
    text: str
    stats: TurnStats = field(default_factory=TurnStats)


def context_window(config: dict[str, Any], override: int | None = None) -> int:
    """The model's context length in tokens (``override`` wins), from its ``config.json``."""
    if override is not None:
        if override < 2:
            raise UserError(f"--context must be at least 2 tokens, got {override}")
        return override
    for key in _CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return FALLBACK_CONTEXT


class ChatSession:
    """One conversation with a model.

    Args:
        model: an mlx-lm model, adapters already applied.
        tokenizer: its mlx-lm ``TokenizerWrapper``; its chat template formats the history.
        decoding: sampling settings (``temperature == 0`` is greedy and deterministic).
        system: the system prompt; None or empty means none at all.
        window: context length in tokens; the oldest turns are dropped to keep the prompt plus
            room for the answer (``max_new_tokens``, at most a quarter of the window) inside it.
        adapters: ``mlx_med.adapters.live.LiveAdapters`` when two adapters are mixed (enables ``/alpha``).
    """

    def __init__(self, model, tokenizer, decoding: DecodingConfig, system: str | None = DEFAULT_SYSTEM_PROMPT,
                 window: int = FALLBACK_CONTEXT, adapters=None):
        self.model, self.tokenizer = model, tokenizer
        self.decoding, self.system, self.window, self.adapters = decoding, system or None, window, adapters
        self.history: list[dict[str, str]] = []
        self.last: TurnStats | None = None
        self._cache: list | None = None
        self._cached_tokens: list[int] = []
        # Streamed pieces of special tokens (a stray <|endoftext|>) are not shown.
        self._special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])

    # -- state changes -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation; the system prompt and settings stay."""
        self.history.clear()
        self.forget_cache()

    def forget_cache(self) -> None:
        self._cache, self._cached_tokens = None, []

    def set_decoding(self, **values) -> None:
        """Change sampling settings (validated by ``DecodingConfig``)."""
        self.decoding = self.decoding.with_overrides(**values)

    @property
    def alpha(self) -> float | None:
        return getattr(self.adapters, "alpha", None)

    def set_alpha(self, alpha: float) -> None:
        """Switch the SFT/PT mix without reloading; the KV cache was computed with the old weights."""
        from mlx_med.adapters.schedule import check_alpha

        if self.adapters is None:
            raise UserError("/alpha needs two adapters: start with --sft RUN --pt RUN")
        self.adapters.set_alpha(check_alpha(alpha, "/alpha"))  # the range rule of --alpha
        self.forget_cache()

    def messages(self, message: str | None = None) -> list[dict[str, str]]:
        """System prompt + history (+ ``message`` as the next user turn), as the template sees them."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.history
        if message is not None:
            out.append({"role": "user", "content": message})
        return out

    # -- answering -----------------------------------------------------------------------------
    def ask(self, message: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer ``message``, streaming text pieces to ``on_text`` as they are decoded.

        The streamed pieces come from mlx-lm's streaming detokenizer; the reply's text (kept in the
        history) is the answer decoded in one go without special tokens, as eval decodes it.

        On Ctrl-C (``KeyboardInterrupt``) the partial answer is kept in the history, ``self.last``
        says ``finish_reason="interrupted"`` and the interrupt is re-raised for the front end.

        Raises:
            UserError: when the message alone does not fit the context window.
        """
        import mlx.core as mx
        from mlx_lm import stream_generate

        prompt, dropped, max_new = self._fit(message)
        self.history.append({"role": "user", "content": message})
        suffix, reused = self._reuse_cache(prompt)
        stats = TurnStats(prompt_tokens=len(prompt), reused_tokens=reused, dropped_turns=dropped, token_limit=max_new)
        self.last = stats
        generated: list[int] = []
        start = first = time.perf_counter()
        stream = stream_generate(
            self.model, self.tokenizer, suffix, max_tokens=max_new, prompt_cache=self._cache,
            sampler=make_sampler(self.decoding), logits_processors=make_logits_processors(self.decoding),
        )
        try:
            for response in stream:
                if not generated:
                    first = time.perf_counter()
                generated.append(response.token)
                stats.finish_reason = response.finish_reason or stats.finish_reason
                if response.text and on_text is not None and response.token not in self._special_ids:
                    on_text(response.text)
        except KeyboardInterrupt:
            stats.finish_reason = "interrupted"
            self.forget_cache()  # a layer may have been updated and the next one not
            raise
        finally:
            stream.close()
            end = time.perf_counter()
            # The stop token ends the answer but is not part of it.
            answer = generated[:-1] if stats.finish_reason == "stop" else generated
            # Decoded like eval's predictions (``generate.py``): special tokens left out.
            text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
            stats.generation_tokens = len(answer)
            stats.prompt_tps = len(suffix) / max(first - start, 1e-9) if generated else 0.0
            stats.generation_tps = (len(generated) - 1) / (end - first) if len(generated) > 1 else 0.0
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            if text:
                self.history.append({"role": "assistant", "content": text})
            else:  # nothing said: forget the question too, so turns stay user/assistant pairs
                self.history.pop()
            if self._cache is not None:
                self._remember_cache(prompt + generated)
        return Reply(text, stats)

    def _fit(self, message: str) -> tuple[list[int], int, int]:
        """Prompt ids for ``message``, dropping the oldest turns until the answer fits the window.

        The answer may use what the window has left, up to ``max_new_tokens``.

        Returns:
            (prompt ids, turns dropped, max new tokens, clamped to the room left).
        """
        # Room kept for the answer when deciding what to drop: a huge --max-new-tokens must not
        # wipe the whole history, so at most a quarter of the window is reserved.
        reserve = min(self.decoding.max_new_tokens, self.window // 4)
        system = [{"role": "system", "content": self.system}] if self.system else []
        history, dropped = list(self.history), 0
        while True:
            prompt = encode_chat(self.tokenizer, [*system, *history, {"role": "user", "content": message}])
            if len(prompt) + reserve <= self.window or not history:
                break
            del history[0]  # a turn is a user message and the replies up to the next one
            while history and history[0]["role"] != "user":
                del history[0]
            dropped += 1
        room = self.window - len(prompt)
        if room < 1:  # refused before anything changes: the history stays as it was
            raise UserError(
                f"the message does not fit the {self.window}-token context window "
                f"(system prompt + message = {len(prompt)} tokens); shorten it or raise --context"
            )
        # The cache stays valid for the shared prefix (the system prompt), see _reuse_cache.
        self.history = history
        return prompt, dropped, min(self.decoding.max_new_tokens, room)

    def _reuse_cache(self, prompt: list[int]) -> tuple[list[int], int]:
        """The part of ``prompt`` the model still has to read, and how many tokens the cache covers."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        if self._cache is not None and can_trim_prompt_cache(self._cache):
            keep = 0
            for a, b in zip(self._cached_tokens, prompt):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(prompt) - 1)  # the last prompt token must go through the model
            if keep > 0:
                trim_prompt_cache(self._cache, len(self._cached_tokens) - keep)
                return prompt[keep:], keep
        self._cache = make_prompt_cache(self.model)
        return prompt, 0

    def _remember_cache(self, tokens: list[int]) -> None:
        """Record which tokens the cache now holds: the first ``offset`` of prompt + answer."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        offsets = {getattr(c, "offset", None) for c in self._cache}
        offset = offsets.pop() if len(offsets) == 1 else None
        if not can_trim_prompt_cache(self._cache) or not isinstance(offset, int) or offset > len(tokens):
            self.forget_cache()
        else:
            self._cached_tokens = tokens[:offset]

    # -- saving and loading ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The conversation in the chat-JSONL ``messages`` layout, plus the settings used."""
        return {
            "messages": self.messages(),
            "mlx_med": {"alpha": self.alpha, "decoding": asdict(self.decoding), "window": self.window},
        }

    def save(self, path: str | Path) -> Path:
        from mlx_med.io import atomic_write_json

        return atomic_write_json(Path(path).expanduser(), self.to_json())

    def load(self, path: str | Path) -> int:
        """Replace system prompt and history with a saved conversation; returns the history length.

        Accepts what ``save`` writes, or a bare JSON list of ``{"role", "content"}`` messages.
        """
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"conversation file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(path, None, None, f"not valid JSON ({err})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list):
            raise DataError(path, None, "messages", "expected a list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(path, None, f"messages[{i}]", "expected {\"role\": ..., \"content\": \"text\"}")
            allowed = ("system", "user", "assistant") if i == 0 else ("user", "assistant")
            if m.get("role") not in allowed:
                raise DataError(path, None, f"messages[{i}].role",
                                f"{m.get('role')!r} is not one of {', '.join(allowed)}")
        if messages and messages[0]["role"] == "system":
            self.system, messages = messages[0]["content"] or None, messages[1:]
        self.history = [{"role": m["role"], "content": m["content"]} for m in messages]
        self.forget_cache()
        return len(self.history)

    def stats_text(self) -> str:
        """A few lines for ``/stats``."""
        import mlx.core as mx

        lines = []
        s = self.last
        if s is None:
            lines.append("no answer yet")
        else:
            lines.append(f"last answer: {s.generation_tokens} tokens at {s.generation_tps:.1f} tok/s "
                         f"(finish: {s.finish_reason or '?'})")
            lines.append(f"prompt: {s.prompt_tokens} tokens, {s.reused_tokens} reused from the cache, "
                         f"{s.prompt_tokens - s.reused_tokens} read at {s.prompt_tps:.1f} tok/s")
        lines.append(f"memory: {_size(mx.get_active_memory())} in use by MLX, peak {_size(mx.get_peak_memory())}; "
                     f"process peak RSS {_size(_peak_rss())}")
        used = len(encode_chat(self.tokenizer, self.messages())) if self.history else 0
        lines.append(f"conversation: {sum(m['role'] == 'user' for m in self.history)} turns, "
                     f"{used}/{self.window} context tokens")
        lines.append(f"settings: {self.settings_text()}")
        return "\n".join(lines)

    def settings_text(self) -> str:
        d = self.decoding
        mode = "greedy" if d.greedy else f"temperature {d.temperature:g}, top_p {d.top_p:g}"
        text = f"{mode}, max {d.max_new_tokens} new tokens"
        if self.alpha is not None:
            text += f", α {self.alpha:g}"
        return text


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


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
