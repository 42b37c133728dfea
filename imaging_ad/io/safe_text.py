"""Outside text (file names, reviewers' notes) made safe where it ends up: a terminal line, a CSV cell.

A file name may hold a newline, a carriage return or an escape sequence; printed raw it splits a
result line in two or rewrites the terminal. A CSV cell starting with ``=`` runs as a formula when
the file is opened in a spreadsheet.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any

#: what makes a spreadsheet read a cell as a formula (OWASP "CSV injection"), tab and CR included
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: strings starting with ``= + - @``, tab or CR get a
    leading ``'`` (OWASP's rule); numbers, negative ones included, stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


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
