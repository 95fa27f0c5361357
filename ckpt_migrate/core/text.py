"""Text helpers for messages that must stay on one line."""

from __future__ import annotations

import re

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_LISTED = 8


def one_line(text: str, limit: int | None = None) -> str:
    """Collapse whitespace and escape control characters (a file name may hold a newline or ANSI codes)."""
    text = _ANSI_ESCAPE.sub("", text)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def describe_exception(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line (a KeyError shows its key)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and exc.args:
        text = repr(exc.args[0])
    text = one_line(text, limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def listed(names: list[str], limit: int = MAX_LISTED, where_all: str = "") -> str:
    """``a, b, c (+5 more)``, or with ``where_all``: ``a, b, c (+5 more; <where_all>)``."""
    shown = ", ".join(names[:limit])
    hint = f"; {where_all}" if where_all else ""
    return shown + (f" (+{len(names) - limit} more{hint})" if len(names) > limit else "")
