"""The chat session engine: one conversation with a loaded model, without any terminal.

``ChatSession`` holds the state (system prompt, history, decoding settings, the live adapter mix)
and answers one message at a time through mlx-lm's ``stream_generate``: the history goes through
the tokenizer's chat template, the oldest turns are dropped to fit the context window, and the KV
cache is kept between turns and reused for the longest prefix the new prompt shares with what the
cache already holds (the previous prompt and answer), so a long conversation does not re-read its
whole history on every turn. The cache is dropped whenever the weights change (``/alpha``) or a
turn is interrupted.

The REPL (``mlx_med/chat/repl.py``) and the HTTP server (``mlx_med/serve``) sit on top of this
module; loading the model and adapters is the commands' job.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_med.errors import DataError, UserError
from mlx_med.evaluation.decoding import DecodingConfig, make_logits_processors, make_sampler
from mlx_med.evaluation.generate import encode_chat
from mlx_med.prompts import DEFAULT_SYSTEM_PROMPT

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
    alpha: float | None = None  # None: mlx_med.adapters.schedule.DEFAULT_ALPHA (or the schedule's default)
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
        # One row a step: the output head is most of the work, and over a weight packed once it reads
        # the head once instead of packing it anew every token (``kernels.pack_projections``).
        from mlx_med.kernels import pack_projections

        self.projections = pack_projections(model)

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
