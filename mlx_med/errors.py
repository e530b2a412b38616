"""Errors caused by the user's input. The CLI prints them as one line, never as a traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (file, flag, config value)."""


class ConfigError(UserError):
    """A bad configuration file or flag."""


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN/inf: training stopped, the last good checkpoint is kept."""


class DataError(UserError):
    """A bad data record. Formats as ``file:line: field 'x': problem``."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")
