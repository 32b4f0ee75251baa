"""Errors instead of tracebacks, warnings instead of silent passes (issue 16, cases 7, 9, 11, 12, 14).

Inputs are built here: a tiny HER2ST-layout section (counts, spot file, image), tiny
spatial ``.h5ad`` files and the cohort of ``test_safe_outputs``.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cpnn.cli import main
from cpnn.errors import CPNNInputError

STEP_PX = 100.0  # pixels per array step (200 µm): mpp 2.0


def _her2st(root: Path, n_side: int = 6, n_genes: int = 8, section: str = "A1", image_px: int = 700) -> Path:
    """A section on an n_side x n_side array grid with an image that holds every spot."""
    rng = np.random.default_rng(0)
    (root / "data" / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "data" / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    img_dir = root / "data" / "ST-imgs" / section[0] / section
    img_dir.mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(1, n_side + 1), np.arange(1, n_side + 1))
    xs, ys = xs.ravel(), ys.ravel()
    ids = [f"{x}x{y}" for x, y in zip(xs, ys)]
    counts = pd.DataFrame(rng.poisson(30, size=(len(ids), n_genes)), index=ids,
                          columns=[f"G{j}" for j in range(n_genes)])
    counts.to_csv(root / "data" / "ST-cnts" / f"{section}.tsv.gz", sep="\t")
    spots = pd.DataFrame({"x": xs, "y": ys, "new_x": xs, "new_y": ys, "pixel_x": xs * STEP_PX,
                          "pixel_y": ys * STEP_PX, "selected": 1})
    spots.to_csv(root / "data" / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    Image.fromarray(np.full((image_px, image_px, 3), 200, np.uint8)).save(img_dir / "he.jpg")
    return root


def _counts_path(root: Path, section: str = "A1") -> Path:
    return root / "data" / "ST-cnts" / f"{section}.tsv.gz"


# ------------------------------------------------------------------ 7. unreadable counts tables
@pytest.mark.parametrize("damage", ["truncated", "empty", "plain_text"])
def test_damaged_counts_table_is_a_clear_error(tmp_path, damage):
    from cpnn.data import read_her2st

    root = _her2st(tmp_path / "h")
    p = _counts_path(root)
    if damage == "truncated":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        p.write_text("gene\tA\nG1\t3\n")  # not gzip at all
    with pytest.raises(CPNNInputError) as info:
        read_her2st(root, "A1", min_counts=0)
    msg = str(info.value)
    assert "A1.tsv.gz" in msg and "counts table" in msg and "Fix:" in msg


def test_damaged_counts_table_through_the_cli(tmp_path, capsys):
    root = _her2st(tmp_path / "h")
    p = _counts_path(root)
    p.write_bytes(p.read_bytes()[:40])
    rc = main(["fit", "--her2st", str(root), "--sections", "A1", "--reference", str(tmp_path / "r.h5ad"),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "cpnn: error:" in err and "A1.tsv.gz" in err and "Traceback" not in err


# ------------------------------------------------------------------ 7. flags refused at parse time
@pytest.mark.parametrize("flags", [["--epochs", "-5"], ["--epochs", "0"], ["--context-rings", "nan"],
                                   ["--context-rings", "-1"], ["--mpp", "1e-6"], ["--mpp", "100"],
                                   ["--patch-um", "inf"]])
def test_impossible_fit_flags_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--h5ad", "x.h5ad", "--reference", "r.h5ad", "--out", str(tmp_path / "run"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "Fix:" in err
    assert not (tmp_path / "run").exists()


def test_extract_mpp_out_of_range_exit_2(tmp_path, capsys):
    from cpnn.cli_extract import main as extract_main

    with pytest.raises(SystemExit) as info:
        extract_main(["--slides", "x.svs", "--out", str(tmp_path / "o"), "--mpp", "100"])
    assert info.value.code == 2 and "plausible" in capsys.readouterr().err


# ------------------------------------------------------------------ 9. mpp sanity in readers
def test_reader_refuses_an_absurd_mpp(tmp_path):
    from cpnn.data import read_her2st

    root = _her2st(tmp_path / "h")
    for bad in (1e-6, 100.0):
        with pytest.raises(CPNNInputError, match="plausible range") as info:
            read_her2st(root, "A1", mpp=bad, min_counts=0)
        assert "--mpp" in str(info.value)


# ------------------------------------------------------------------ 11. silent passes made visible
def test_many_spots_without_counts_are_announced(tmp_path):
    from cpnn.data import read_her2st

    root = _her2st(tmp_path / "h")
    p = _counts_path(root)
    counts = pd.read_csv(p, sep="\t", index_col=0)
    counts.iloc[: int(0.4 * len(counts))].to_csv(p, sep="\t")  # counts for 40 % of the spots
    with pytest.warns(UserWarning, match=r"many spots dropped: 22 of 36 \(61%\) selected spots have no row"):
        a = read_her2st(root, "A1", min_counts=0)["A1"]
    assert a.n_obs == 14


def test_spots_below_min_counts_are_announced(tmp_path):
    from cpnn.data import read_her2st

    root = _her2st(tmp_path / "h")
    p = _counts_path(root)
    counts = pd.read_csv(p, sep="\t", index_col=0)
    counts.iloc[:3] = 0
    counts.to_csv(p, sep="\t")
    with pytest.warns(UserWarning, match=r"3 of 36 .* fewer than 1 UMI"):
        read_her2st(root, "A1", min_counts=1)


def test_duplicated_gene_column_is_summed_not_renamed(tmp_path):
    from cpnn.data import read_her2st

    root = _her2st(tmp_path / "h")
    p = _counts_path(root)
    counts = pd.read_csv(p, sep="\t", index_col=0)
    cols = list(counts.columns)
    cols[3] = "G1"  # the file names G1 twice
    counts.columns = cols
    counts.to_csv(p, sep="\t")
    with pytest.warns(UserWarning, match="duplicated gene name"):
        a = read_her2st(root, "A1", min_counts=0)["A1"]
    assert "G1.1" not in a.var_names and "G3" not in a.var_names and a.n_vars == 7
    np.testing.assert_array_equal(a[:, "G1"].X.toarray().ravel(), counts.iloc[:, [1, 3]].sum(1).to_numpy())


def test_prototypes_smaller_than_the_panel_and_one_type_reference(tmp_path):
    from cpnn.prototypes import Prototypes
    from cpnn.workflows.fit import FitOptions, load_or_build_prototypes

    genes = [f"G{j}" for j in range(8)]
    small = Prototypes(np.ones((2, 5)), ["A", "B"], genes[:5], "naive", "cell_type", {})
    small.save(tmp_path / "p.h5ad")
    with pytest.warns(UserWarning, match="covers 5 of the 8 target genes"):
        protos = load_or_build_prototypes(FitOptions(reference=str(tmp_path / "p.h5ad")), genes)
    assert protos.genes == genes[:5]
    one = Prototypes(np.ones((1, 8)), ["Epithelial"], genes, "naive", "cell_type", {})
    one.save(tmp_path / "one.h5ad")
    with pytest.raises(CPNNInputError, match="only one cell type .'Epithelial'.") as info:
        load_or_build_prototypes(FitOptions(reference=str(tmp_path / "one.h5ad")), genes)
    assert "--label" in str(info.value)


def test_one_type_reference_is_refused_when_building(tmp_path):
    import anndata as ad

    from cpnn.workflows.fit import FitOptions, load_or_build_prototypes

    rng = np.random.default_rng(0)
    genes = [f"G{j}" for j in range(300)]
    ref = ad.AnnData(X=rng.poisson(3, size=(60, 300)).astype(np.float32),
                     obs=pd.DataFrame({"ct": ["T-cells"] * 60}, index=[f"c{i}" for i in range(60)]),
                     var=pd.DataFrame(index=genes))
    ref.write_h5ad(tmp_path / "ref.h5ad")
    opts = FitOptions(reference=str(tmp_path / "ref.h5ad"), label="ct", prototype_method="naive")
    with pytest.raises(CPNNInputError, match="one cell type"):
        load_or_build_prototypes(opts, genes[:20])


def test_predict_says_which_flags_it_ignores(tmp_path, capsys):
    rc = main(["predict", str(tmp_path / "no-run"), "--h5ad", str(tmp_path / "x.h5ad"), "--tta", "flips",
               "--encoder", "uni", "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2  # the inputs do not exist; the warning came first
    assert "cpnn: warning: --encoder, --tta ignored" in err


# ------------------------------------------------------------------ 12. spots outside the image
def test_spots_outside_the_image_are_dropped_and_extraction_runs(tmp_path):
    from cpnn.data import read_her2st
    from cpnn.image import open_slide, validate_centers

    root = _her2st(tmp_path / "h", n_side=20, image_px=2050)
    sp = root / "data" / "ST-spotfiles" / "A1_selection.tsv"
    spots = pd.read_csv(sp, sep="\t")
    spots.loc[:2, "pixel_x"] = 2060.0  # three spots just beyond the image's right edge
    spots.to_csv(sp, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"3 of 400 spot centres lie outside .*dropped"):
        a = read_her2st(root, "A1", min_counts=0)["A1"]
    assert a.n_obs == 397 and len(a.uns["cpnn_input"]["dropped_outside_image"]) == 3
    with open_slide(a.uns["cpnn_input"]["image_path"], mpp=a.uns["cpnn_input"]["mpp"]) as sl:
        validate_centers(sl, a.obsm["spatial"])  # the old reader kept them: extraction refused the section


# ------------------------------------------------------------------ 14. messages
def test_fix_is_always_its_own_sentence():
    e = CPNNInputError("no layer 'x' (have a, b)", path="/d/f.h5ad", field="layers", fix="pick one")
    assert str(e) == "/d/f.h5ad [layers]: no layer 'x' (have a, b). Fix: pick one"
    assert str(CPNNInputError("bad.", fix="x")) == "bad. Fix: x"


def test_model_load_error_does_not_advise_weights_only_false(tmp_path):
    import os

    torch = pytest.importorskip("torch")
    from cpnn.model.files import read_model_file

    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    p = tmp_path / "model.cpnn"
    torch.save({"x": Payload()}, p)
    with pytest.raises(CPNNInputError) as info:
        read_model_file(p, "cpnn-model", "cpnn model", "`cpnn fit`")
    msg = str(info.value)
    assert "model.cpnn" in msg and "weights_only" not in msg and "Fix:" in msg


def test_reference_label_error_names_the_flag(tmp_path):
    import anndata as ad

    from cpnn.prototypes import read_reference

    a = ad.AnnData(X=np.ones((4, 3), np.float32), obs=pd.DataFrame({"ct": list("aabb")}, index=list("wxyz")))
    a.write_h5ad(tmp_path / "ref.h5ad")
    with pytest.raises(CPNNInputError) as info:
        read_reference(tmp_path / "ref.h5ad", "celltype")
    assert "--label" in str(info.value)


def test_read_table_keeps_gzip_errors_clear(tmp_path):
    from cpnn.data.tables import read_table

    p = tmp_path / "t.tsv.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("")
    with pytest.raises(CPNNInputError, match="t.tsv.gz.*empty"):
        read_table(p, sep="\t", index_col=0)


def test_config_values_are_checked_like_flags(tmp_path):
    """The same impossible values given in a --config YAML: clear errors, never NaN in config.json."""
    import argparse

    from cpnn.cli_spatial import load_yaml
    from cpnn.workflows.fit import FitOptions

    args = argparse.Namespace(reference="r.h5ad", label=None, batch=None, prototype_method=None, genes=None,
                              n_top_genes=None, level=None, seed=None, encoder=None, patch_um=None, tta=None,
                              context_rings=None, subpatch_grid=None, residual_head=None, epochs=None)
    for text, words in (("features:\n  context_rings: .nan\n", "context_rings must be a finite"),
                        ("train:\n  max_epochs: 0\n", "max_epochs")):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(CPNNInputError, match=words) as info:
            opts = FitOptions.from_sources(load_yaml(tmp_path / "c.yaml"), args)
            opts.train_config()
        assert "Fix:" in str(info.value)


def test_slide_larger_than_any_glass_slide_is_refused():
    """`--mpp 20` on a 10,000 px image: 200 mm wide, millions of tiles — refused at once."""
    from cpnn.image import ArraySlide, tile_grid

    sl = ArraySlide(np.zeros((10, 10_000, 3), np.uint8), mpp=20.0)
    with pytest.raises(CPNNInputError, match=r"200 x 0 mm.*microns per pixel are wrong") as info:
        tile_grid(sl, tile_px=256, target_mpp=0.5, min_tissue=0)
    assert "--mpp" in str(info.value)
    assert len(tile_grid(ArraySlide(np.zeros((10, 10_000, 3), np.uint8), mpp=0.5), min_tissue=0)) == 40  # 256 px tiles


def test_prototypes_out_folder_and_missing_gene_file_are_clear(tmp_path, capsys):
    rc = main(["prototypes", "--reference", str(tmp_path / "r.h5ad"), "--label", "ct", "--out", str(tmp_path)])
    assert rc == 2 and "existing folder" in capsys.readouterr().err
    rc = main(["prototypes", "--reference", str(tmp_path / "r.h5ad"), "--label", "ct", "--genes",
               str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.txt" in err and "Traceback" not in err
