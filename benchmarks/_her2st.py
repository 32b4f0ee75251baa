"""What the HER2ST benchmark scripts share: the five imaged sections with features, and
prototypes over the 785-gene panel. Imported by the scripts next to it."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def load_sections(data_dir: Optional[str], feature_cache, tta: str = "none",
                  context_rings: float = 0.0, subpatch_grid: int = 1) -> Tuple[Path, Dict[str, object]]:
    """(data folder, {section: SpatialSample with features}) for C2-C6; exits when no data.
    With ``subpatch_grid > 1`` the features are ``(spots, grid**2, D)`` sub-patch bags."""
    from cpnn.utils import find_data_dir
    from cpnn.workflows.spatial import FeatureSpec, attach_features, load_inputs

    data = find_data_dir(data_dir)
    if data is None:
        raise SystemExit("data folder not found: pass --data-dir or set CPNN_DATA_DIR")
    samples = {s.sample_id: s for s in load_inputs(her2st=str(data / "her2st"), sections=SECTIONS)}
    spec = FeatureSpec(tta=tta, context_rings=context_rings, subpatch_grid=subpatch_grid)
    cache = feature_cache if subpatch_grid == 1 or feature_cache is None else Path(feature_cache) / f"grid{subpatch_grid}"
    attach_features(list(samples.values()), spec, cache_dir=cache, progress=False)
    return data, samples


def panel_prototypes(data: Path, samples: Dict[str, object], label: str, method: str = "regression",
                     same_names_only: bool = False):
    """Prototypes of ``label`` (Wu et al. reference) over the panel genes measured in every section.

    By default genes named differently in the reference (old vs new symbols) are matched
    through aliases by ``build_prototypes``; ``same_names_only`` keeps only genes spelt the
    same on both sides, for callers that index the sections by the prototypes' gene names.
    """
    from cpnn.prototypes import build_prototypes, read_reference
    from cpnn.workflows.fit import read_gene_list

    panel = read_gene_list(data / "her2st" / "her2st_785_genes.txt")
    ref = read_reference(data / "reference" / "wu2021_CID4465.h5ad", label)
    ref_names = set(ref.var_names)
    genes = [g for g in panel if (g in ref_names or not same_names_only)
             and all(g in set(s.adata.var_names) for s in samples.values())]
    return build_prototypes(ref, label, method=method, genes=genes, seed=0)
