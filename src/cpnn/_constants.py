"""AnnData keys written and read by cpnn (one place, no scattered string literals)."""

# obsm
SPATIAL = "spatial"  # (x, y) in full-resolution (level-0) pixels
WEIGHTS = "cpnn_weights"  # observations x cell types, rows sum to 1
SUBPATCH_WEIGHTS = "cpnn_subpatch_weights"  # spots x sub-patches x cell types (spots as sub-patch bags)
TRUE_PROPORTIONS = "true_proportions"  # synthetic ground truth (obs x types)

# varm
PROTOTYPES = "cpnn_prototypes"  # genes x cell types

# layers
COUNTS = "counts"
MIXTURE_LAYER = "cpnn_mixture"  # predicted log1p CP10k of the cell-type mixture alone (residual head on)

# uns
UNS = "cpnn"  # parameters, cell-type names, provenance
UNS_INPUT = "cpnn_input"  # image path, microns per pixel, spot diameter, sample id

# obs
SECTION = "section"
PATIENT = "patient"
SAMPLE = "sample"

# plausible microns per pixel of an H&E image (refused outside): 0.05 is beyond any optical
# scanner, 20 a thumbnail; scans are about 0.25 (40x) to 1
MPP_MIN = 0.05
MPP_MAX = 20.0
