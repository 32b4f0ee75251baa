"""Reading and writing the self-describing ``torch.save`` files of trained models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

from ..errors import CPNNInputError, first_line  # noqa: F401  (first_line: re-exported)


def write_model_file(path: Union[str, os.PathLike], payload: Dict[str, Any]) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically (a crash never leaves half a file)."""
    import torch

    from ..utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_model_file(path: Union[str, os.PathLike], fmt: str, what: str, written_by: str,
                    other_hint: str = "") -> Dict[str, Any]:
    """The payload of a file written by :func:`write_model_file` whose ``format`` is ``fmt``.

    Parameters
    ----------
    path
        The file.
    fmt
        Expected value of the payload's ``format`` key.
    what
        What the file is, for messages (e.g. ``"cpnn model"``).
    written_by
        What writes such files, for the fix of a missing file.
    other_hint
        Fix shown when the file is readable but of another format.

    Raises
    ------
    CPNNInputError
        Missing, unreadable (with the underlying error) or of another format.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CPNNInputError(f"{what} file not found", path=path, fix=f"pass the path written by {written_by}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CPNNInputError(f"not a readable {what} file ({type(exc).__name__}: {first_line(exc)})", path=path,
                             fix=f"pass a file written by {written_by}; cpnn loads model files without running "
                                 "code, so a file that needs more is refused on purpose") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CPNNInputError(f"not a {what} file (missing 'format': '{fmt}')", path=path, fix=other_hint or None)
    return payload
