"""System prompts for the medical assistant (chat, evaluation and safety checks share these).

The default prompt keeps the model in its lane: it informs, it does not diagnose or prescribe,
and it sends emergencies to emergency services first. ``mlx-med chat --system`` replaces it.
"""

from __future__ import annotations

from mlx_med.errors import UserError

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical information assistant. You are not a doctor and you cannot examine "
    "the user, so do not give a diagnosis or prescribe treatment; explain what is known, what the "
    "usual options are, and when to see a health professional. Answer clearly and briefly, and say "
    "so when you are unsure. If the user describes an emergency (for example chest pain, trouble "
    "breathing, signs of stroke, severe bleeding or thoughts of self-harm), tell them first to call "
    "their local emergency number or go to the nearest emergency department."
)

DEFAULT_SYSTEM_PROMPT_ZH = (
    "你是一个谨慎的医学信息助手。你不是医生，也无法为用户做检查，所以不要做出诊断或开具处方；"
    "请说明已知的情况、常见的处理方式，以及何时应当就医。回答要清楚、简洁，不确定时要如实说明。"
    "如果用户描述的是紧急情况（例如胸痛、呼吸困难、中风征兆、严重出血或有自伤念头），"
    "请首先提醒对方立即拨打当地急救电话（中国大陆为120）或前往最近的急诊科。"
)

SYSTEM_PROMPTS: dict[str, str] = {"en": DEFAULT_SYSTEM_PROMPT, "zh": DEFAULT_SYSTEM_PROMPT_ZH}


def system_prompt(language: str = "en") -> str:
    """The default medical-assistant system prompt in ``language`` (``"en"`` or ``"zh"``).

    Raises:
        UserError: for a language without a prompt.
    """
    try:
        return SYSTEM_PROMPTS[language]
    except KeyError:
        raise UserError(
            f"no default system prompt for language {language!r} (choose from {', '.join(SYSTEM_PROMPTS)})"
        ) from None


DEFAULT_KEYWORD = "default"


def guess_language(texts) -> str:
    """``zh`` when the texts hold any CJK ideograph, else ``en`` (for the ``default`` prompt's language)."""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for text in texts for ch in text) else "en"


def resolve_system(system: str | None, lang: str | None = None, texts=()) -> str | None:
    """The one reading of a ``--system`` value, for every command that takes one.

    ``none`` or empty → no system prompt (the chat template's own); ``default`` → this module's medical
    prompt; ``@FILE`` → the file's text; anything else → itself.

    Args:
        system: the flag's value; None means "not given".
        lang: language of the ``default`` prompt (``en``/``zh``; other codes fall back to English).
            When None or ``auto``, it is guessed from ``texts``; with no texts either, ``default`` is
            returned as the keyword ``"default"`` for the caller to resolve per item (the safety
            suite picks each probe's language).
        texts: sample of the data (questions, turns) to guess the language from.

    Raises:
        UserError: when ``@FILE`` is missing or empty.
    """
    if system is None or system.strip().lower() in ("", "none"):
        return None
    if system.strip().lower() == DEFAULT_KEYWORD:
        if lang in (None, "auto"):
            texts = list(texts)
            if not texts:
                return DEFAULT_KEYWORD
            lang = guess_language(texts)
        return SYSTEM_PROMPTS.get(lang, DEFAULT_SYSTEM_PROMPT)
    if system.startswith("@"):
        from pathlib import Path

        path = Path(system[1:]).expanduser()
        if not path.is_file():
            raise UserError(f"--system {system}: file not found: {path}")
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise UserError(f"--system {system}: the file is empty")
        return text
    return system
