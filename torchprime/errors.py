"""Errors that are the user's to fix (config, data, checkpoints), and the helpers that collect
them: every problem of a config is reported at once, each naming its key and value."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key, the value and what would.
    One error may carry several problems (`problems`), each one line."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """The names most like `name`, for "did you mean" lines; "(none alike)" when none is."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)
    return ", ".join(close) if close else "(none alike)"


class Problems(list):
    """Problems found so far, each one line naming a key and a value."""

    def check(self, ok: bool, message: str) -> None:
        """Note `message` unless `ok`."""
        if not ok:
            self.append(message)

    def attempt(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(*args)`, or None with its ConfigError noted."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            self.extend(e.problems)
            return None

    def raise_if_any(self) -> None:
        """One ConfigError listing every problem (the one problem itself when alone)."""
        if len(self) == 1:
            raise ConfigError(self[0])
        if self:
            raise ConfigError(f"{len(self)} problems:\n  - " + "\n  - ".join(self), list(self))
