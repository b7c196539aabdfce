"""The command line's comma-separated option values (``--seeds 0,1,2``, ``--methods ccd,finetune``).

One rule for every such option: an empty entry (``1,,2``, ``0,1,``) and a repeated one (``0,0,1``)
are one-line errors (:class:`ccdrec.errors.CcdrecError`), never silently dropped, since either is a
typo more often than a wish.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from typing import TypeVar

from ccdrec.errors import CcdrecError

T = TypeVar("T")


def shell_word(value) -> str:
    """``value`` (a path, a name) as one word of a shell command a message prints: quoted when it holds spaces,
    quotes or other characters the shell reads (``my run`` -> ``'my run'``), so the command can be copied."""
    return shlex.quote(str(value))


def comma_list(text: str, option: str, *, repeats: bool = False, strip: bool = True) -> list[str]:
    """``" a, b "`` -> ``["a", "b"]`` (entries stripped; with ``strip=False`` kept as written, ``[" a", " b "]``,
    for IDs that may hold spaces).

    Errors: no entry at all, an empty (or blank) entry, or (unless ``repeats``) an entry given twice.
    """
    entries = [x.strip() if strip else x for x in text.split(",")]
    if not any(x.strip() for x in entries):
        raise CcdrecError(f"{option} names no value")
    for pos, x in enumerate(entries, 1):
        if not x.strip():
            raise CcdrecError(
                f"{option} has an empty entry ({_ordinal(pos)} of {len(entries)} in {text!r}): one value between commas"
            )
    if not repeats:
        _no_repeats(entries, option, text)
    return entries


def comma_values(text: str, option: str, parse: Callable[[str], T]) -> list[T]:
    """:func:`comma_list` with every entry converted by ``parse`` (which raises :class:`CcdrecError`),
    repeats judged on the converted values (``1,01`` names 1 twice)."""
    out = [parse(x) for x in comma_list(text, option, repeats=True)]
    _no_repeats(out, option, text)
    return out


def one_of(allowed: Iterable[str], what: str) -> Callable[[str], str]:
    """A parser for :func:`comma_values` that accepts the names in ``allowed`` only."""
    names = list(allowed)

    def parse(x: str) -> str:
        if x not in names:
            raise CcdrecError(f"unknown {what} {x!r}; expected some of {', '.join(names)}")
        return x

    return parse


def _no_repeats(values: list, option: str, text: str) -> None:
    seen = []
    for v in values:
        if v in seen:
            raise CcdrecError(f"{option} names {v!r} twice (in {text!r})")
        seen.append(v)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


__all__ = ["comma_list", "comma_values", "one_of"]
