"""Unknown keys in a benchmark config are errors: a typo (``methdos:``, ``n_fold``, a
method option spelt wrong) would otherwise silently run a default."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from ..errors import CPNNInputError

#: Keys of the sections whose keys the harness reads (``data``'s depend on its kind and
#: are checked by the readers).
SECTION_KEYS = {
    "split": ("by", "scheme", "n_folds", "val_fraction", "seed"),
    "features": ("encoder", "patch_um", "out_px", "tta", "subpatch_grid", "cache_dir", "file_pattern",
                 "features_dir", "context_rings"),
    "evaluation": ("min_counts", "figures", "map_genes"),
}

#: Keys every method entry may have, whatever its kind (``features``: the feature variant,
#: read by the harness; it may also be a candidate).
METHOD_KEYS = ("name", "kind", "candidates", "features")


def _refuse(unknown: Iterable[str], valid: Iterable[str], where: str, path=None) -> None:
    unknown = sorted(unknown)
    if unknown:
        raise CPNNInputError(f"unknown key(s) in {where}: {', '.join(unknown)}", path=path,
                             field=f"{where}.{unknown[0]}" if where != "the config" else unknown[0],
                             fix=f"valid keys: {', '.join(sorted(valid))}")


def check_benchmark_keys(cfg: Dict[str, Any], top_level: Iterable[str], path=None) -> None:
    """Refuse unknown top-level keys, section keys and method options of a benchmark config.

    Parameters
    ----------
    cfg
        The config as written (before defaults are merged in).
    top_level
        The valid top-level keys.
    path
        The config file, for messages.

    Raises
    ------
    CPNNInputError
        Naming the unknown key and listing the valid ones.
    """
    from .methods import method_options

    _refuse(set(cfg) - set(top_level), top_level, "the config", path)
    for section, keys in SECTION_KEYS.items():
        value = cfg.get(section)
        if isinstance(value, dict):
            _refuse(set(value) - set(keys), keys, section, path)
    for i, m in enumerate(cfg.get("methods") or []):
        if not isinstance(m, dict):
            raise CPNNInputError(f"methods[{i}] must be a mapping with name and kind", path=path, field="methods")
        valid: Optional[tuple] = method_options(str(m.get("kind", "")))
        if valid is None:  # a kind registered without a list of options
            continue
        where = f"methods[{m.get('name', i)}]"
        _refuse(set(m) - set(METHOD_KEYS) - set(valid), (*METHOD_KEYS, *valid), where, path)
        cands = m.get("candidates")
        if isinstance(cands, dict):
            _refuse(set(cands) - set(valid) - {"features"}, (*valid, "features"), f"{where}.candidates", path)
        if m.get("kind") == "cpnn":  # its model:/train: dicts and values, resolved as the run will
            from .methods import cpnn_configs

            try:
                cpnn_configs({k: v for k, v in m.items() if k != "candidates"}, seed=0)
            except CPNNInputError as exc:
                raise CPNNInputError(exc.problem, path=path, field=f"{where}.{exc.field}", fix=exc.fix) from None
