"""Checks that turn silent passes into visible warnings or clear errors (issue 16, case 11).

Each function looks at one thing a user may not have meant: a flag that has no effect,
a prototypes file that shrinks the gene panel, a reference with a single cell type, many
spots dropped. Warnings go through :mod:`warnings`; the command line prints them as
``cpnn: warning: ...``.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..data._validate import warn_dropped  # noqa: F401  (re-exported: fit warns with it too)
from ..errors import CPNNInputError

# predict's feature flags (shared with fit) that the model decides instead
_MODEL_DECIDES = (("encoder", "--encoder", "name"), ("tta", "--tta", "tta"), ("patch_um", "--patch-um", "patch_um"),
                  ("subpatch_grid", "--subpatch-grid", "subpatch_grid"),
                  ("context_rings", "--context-rings", "context_rings"))


def warn_ignored_predict_flags(args: Any) -> None:
    """``cpnn predict`` uses the model's feature settings: say so for each flag given."""
    given = [flag for attr, flag, _ in _MODEL_DECIDES if getattr(args, attr, None) is not None]
    if given:
        warnings.warn(f"{', '.join(given)} ignored: predict extracts features exactly as the model was trained "
                      "(its encoder, patch size, TTA, sub-patches and context; see the run's config.json)",
                      stacklevel=2)


def check_reference_types(cell_types: Sequence[str], source: Any = None, field: str = "--label") -> None:
    """A model of one cell type predicts weight 1 everywhere: refuse it."""
    if len(cell_types) < 2:
        got = f"only one cell type ({list(cell_types)[0]!r})" if len(cell_types) == 1 else "no cell type"
        raise CPNNInputError(f"the reference has {got}; CPNN mixes at least two", path=source, field=field,
                             fix="choose a --label column with several cell types, or a reference holding them")


def warn_panel_shrunk(n_wanted: int, n_kept: int, source: Any, what: str = "the prototypes file") -> None:
    """A panel that lost genes on the way (e.g. a prototypes file built on fewer genes)."""
    if n_kept < n_wanted:
        warnings.warn(f"{what} ({source}) covers {n_kept} of the {n_wanted} target genes; the model is trained "
                      f"on those {n_kept}", stacklevel=2)


def check_choices(requested: Any, available: Sequence[Any], flag: str, what: str) -> None:
    """Refuse ``requested`` values that are not among ``available`` (before any output)."""
    if requested is None:
        return
    unknown = [r for r in requested if r not in set(available)]
    if unknown or not requested:
        shown = ", ".join(map(str, available))
        raise CPNNInputError(f"unknown {what} {', '.join(map(str, unknown)) or '(none given)'}; this run has: {shown}",
                             field=flag, fix=f"pick from those, e.g. {flag} {available[0] if available else '...'}")
