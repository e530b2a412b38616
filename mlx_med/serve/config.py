"""Settings of ``mlx-med serve`` (YAML keys = these names; flags override them). Free of MLX imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """What to load, where to listen, and the limits every request is held to."""

    model: str | None = None
    adapter: str | None = None  # one adapter or training run directory
    sft: str | None = None  # with pt: the pair mixed per request, ΔW = α·ΔW_sft + (1−α)·ΔW_pt
    pt: str | None = None
    alpha: float | None = None  # the server-wide α of the ``merged`` model; None: DEFAULT_ALPHA
    host: str = "127.0.0.1"  # any other address needs api_key
    port: int = 8080  # 0: a free port (printed at start)
    api_key: str | None = None  # clients send "Authorization: Bearer KEY"
    system: str | None = None  # None: the default medical-assistant prompt in ``lang``; "@FILE" reads it
    lang: str = "en"
    temperature: float = 0.7  # defaults for requests that do not set them (as in chat)
    top_p: float = 0.9
    max_tokens: int = 256  # new tokens when a request does not say
    max_tokens_limit: int = 4096  # a request asking for more is refused (400)
    max_body_bytes: int = 1_000_000  # larger request bodies are refused (413)
    context: int | None = None  # tokens; None: the model's own window
    batch_size: int = 8  # sequences decoded together; more requests wait for a free slot
    log_prompts: bool = False  # log message bodies too (off: only sizes and timings)

    def system_prompt(self) -> str | None:
        """The system prompt added to chat requests that carry none (as ``mlx-med chat`` does)."""
        from mlx_med.chat.session import ChatConfig

        return ChatConfig(system=self.system, lang=self.lang).system_prompt()
