"""Errors raised for bad input.

Every message names *what* (file and field) is wrong and *how* to fix it, so that users
never have to read a traceback from deep inside a library.
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class CPNNInputError(ValueError):
    """Input data that cpnn cannot use, with the place and the fix in the message.

    Parameters
    ----------
    problem
        What is wrong, in one sentence.
    path
        The file or folder concerned, if any.
    field
        The column, key, attribute or argument concerned, if any.
    fix
        What the user should do about it.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: Optional[PathLike] = None,
        field: Optional[str] = None,
        fix: Optional[str] = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.fix = fix
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}")
        if field is not None:
            parts.append(f"[{field}]")
        where = " ".join(parts)
        message = f"{where}: {problem}" if where else problem
        if fix:  # always its own sentence, so "Fix:" never runs on from the problem
            message = message.rstrip()
            message += ("" if message.endswith((".", "!", "?")) else ".") + f" Fix: {fix}"
        super().__init__(message)


def first_line(exc: BaseException) -> str:
    """The cause of a load error without torch's advice to retry with ``weights_only=False``
    (which would run arbitrary code from the file)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and "WeightsUnpickler" not in ln
            and "Re-running" not in ln and "trust" not in ln.lower()]
    return (keep or lines or [type(exc).__name__])[0][:300].rstrip(".")
