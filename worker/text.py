"""Text squeezed for one line of output: error messages, table cells, log fields."""

from __future__ import annotations


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, with an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: object, limit: int = 300) -> str:
    """Any value as one bounded line: runs of white space (newlines too) become one space."""
    return clip(" ".join(str(text).split()), limit)
