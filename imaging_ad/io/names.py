"""File names as text that is safe to print on one line: control characters escaped.

A file name may hold a newline, a carriage return or an escape sequence; printed raw it splits a
result line in two or rewrites the terminal. Everything else (accents, CJK) prints as it is.
"""

from __future__ import annotations

import os
import unicodedata

_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: str | os.PathLike) -> str:
    """``text`` with control characters, line separators and undecodable bytes escaped (``\\n``,
    ``\\x1b``, ``\\udcff``); backslashes are doubled only when something else was escaped, so ordinary
    Windows paths print unchanged."""
    text = os.fspath(text)
    if all(not _needs_escape(ch) for ch in text):
        return text
    return "".join(_escape(ch) for ch in text)


def _needs_escape(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in ("Cc", "Zl", "Zp", "Cs")  # control, line/paragraph separator, lone surrogate


def _escape(ch: str) -> str:
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    if not _needs_escape(ch):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
