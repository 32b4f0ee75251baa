"""GDC STAR counts, bulk tables and TCGA barcode helpers on files generated here."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cpnn.data import (
    match_slides_to_samples,
    parse_tcga_barcode,
    patient_id,
    read_bulk_table,
    read_gdc_star_counts,
    read_gdc_star_folder,
    sample_id,
)
from cpnn.errors import CPNNInputError

HEADER = ("gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\t"
          "tpm_unstranded\tfpkm_unstranded\tfpkm_uq_unstranded")
GENES = [  # id, name, type
    ("ENSG00000000003.15", "TSPAN6", "protein_coding"),
    ("ENSG00000000005.6", "TNMD", "protein_coding"),
    ("ENSG00000002586.20", "CD99", "protein_coding"),
    ("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding"),
    ("ENSG00000230417.11", "LINC00595", "lncRNA"),
    ("ENSG00000187634.13", "SAMD11", "protein_coding"),
]


def _write_star(path, counts, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["# gene-model: GENCODE v36", HEADER]
    for name, n in (("N_unmapped", 2954058), ("N_multimapping", 5034924),
                    ("N_noFeature", 2420958), ("N_ambiguous", 3574868)):
        lines.append(f"{name}\t\t\t{n}\t{n + 1}\t{n + 2}\t\t\t")
    tpm = counts / counts.sum() * 1e6
    for (gid, name, gtype), c, t in zip(GENES, counts, tpm):
        s1 = int(rng.integers(0, c + 1))
        lines.append(f"{gid}\t{name}\t{gtype}\t{c}\t{s1}\t{c - s1}\t{t:.4f}\t{t / 3:.4f}\t{t / 2:.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return tpm


def test_star_counts_symbols_ids_tpm(tmp_path):
    counts = np.array([3044, 0, 120, 7, 15, 40])
    p = tmp_path / "f.rna_seq.augmented_star_gene_counts.tsv"
    tpm = _write_star(p, counts)
    with pytest.warns(UserWarning, match="CD99"):
        s = read_gdc_star_counts(p)
    assert list(s.index) == ["TSPAN6", "TNMD", "CD99", "LINC00595", "SAMD11"]
    np.testing.assert_array_equal(s.to_numpy(), [3044, 0, 127, 15, 40])
    assert s.attrs["gene_model"] == "GENCODE v36"
    assert s.attrs["star_summary"] == {"N_unmapped": 2954058, "N_multimapping": 5034924,
                                       "N_noFeature": 2420958, "N_ambiguous": 3574868}
    assert s.attrs["duplicated_genes"] == ["CD99"]
    g = read_gdc_star_counts(p, index="gene_id")
    assert list(g.index) == ["ENSG00000000003", "ENSG00000000005", "ENSG00000002586",
                             "ENSG00000002586_PAR_Y", "ENSG00000230417", "ENSG00000187634"]
    np.testing.assert_array_equal(g.to_numpy(), counts)
    t = read_gdc_star_counts(p, column="tpm_unstranded", index="gene_id")
    np.testing.assert_allclose(t.to_numpy(), tpm, atol=1e-4)
    pc = read_gdc_star_counts(p, index="gene_id", gene_types=["protein_coding"])
    assert "ENSG00000230417" not in pc.index and len(pc) == 5


def test_star_counts_errors(tmp_path):
    p = tmp_path / "x_star_gene_counts.tsv"
    _write_star(p, np.arange(6) * 10)
    with pytest.raises(CPNNInputError, match="unknown column"):
        read_gdc_star_counts(p, column="counts")
    text = p.read_text().replace("\t50\t", "\t50.5\t", 1)
    p.write_text(text)
    with pytest.raises(CPNNInputError, match="non-integer") as ei:
        read_gdc_star_counts(p)
    assert "[unstranded]" in str(ei.value)
    q = tmp_path / "bad.tsv"
    q.write_text("gene\tcount\nA\t1\n")
    with pytest.raises(CPNNInputError, match=r"missing column\(s\)"):
        read_gdc_star_counts(q)


def _gdc_download(tmp_path, n=3):
    root = tmp_path / "gdc"
    sheet = []
    mats = []
    for i in range(n):
        counts = np.random.default_rng(i).integers(0, 500, size=len(GENES))
        uuid = f"0000000{i}-aaaa-bbbb-cccc-dddddddddddd"
        fname = f"{uuid}.rna_seq.augmented_star_gene_counts.tsv"
        _write_star(root / f"fid{i}" / fname, counts, seed=i)
        case = f"TCGA-AB-{1000 + i}"
        sheet.append({"File ID": f"fid{i}", "File Name": fname, "Data Category": "Transcriptome Profiling",
                      "Data Type": "Gene Expression Quantification", "Project ID": "TCGA-KIRC",
                      "Case ID": f"{case}, {case}", "Sample ID": f"{case}-01A", "Sample Type": "Primary Tumor"})
        mats.append(counts)
    pd.DataFrame(sheet).to_csv(tmp_path / "sheet.tsv", sep="\t", index=False)
    return root, tmp_path / "sheet.tsv", np.array(mats)


def test_star_folder_with_sample_sheet(tmp_path):
    root, sheet, mats = _gdc_download(tmp_path)
    a = read_gdc_star_folder(root, sheet, index="gene_id")
    assert a.shape == (3, len(GENES))
    assert list(a.obs_names) == [f"TCGA-AB-{1000 + i}-01A" for i in range(3)]
    assert a.obs["patient"].tolist() == [f"TCGA-AB-{1000 + i}" for i in range(3)]
    np.testing.assert_array_equal(a.X.toarray(), mats)
    assert a.uns["cpnn_input"]["gene_model"] == "GENCODE v36"
    # sheet missing a file
    s = pd.read_csv(sheet, sep="\t").iloc[:2]
    s.to_csv(tmp_path / "sheet2.tsv", sep="\t", index=False)
    with pytest.raises(CPNNInputError, match=r"1 of 3 files are not in the sample sheet"):
        read_gdc_star_folder(root, tmp_path / "sheet2.tsv")
    # another gene model in the folder
    extra = root / "fid9" / "zz.rna_seq.augmented_star_gene_counts.tsv"
    _write_star(extra, np.ones(len(GENES), int))
    extra.write_text(extra.read_text().replace("SAMD11", "SAMD11X").replace("ENSG00000187634", "ENSG00000999999"))
    with pytest.raises(CPNNInputError, match="gene list differs"):
        read_gdc_star_folder(root, index="gene_id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CPNNInputError, match="no '\\*star_gene_counts.tsv'"):
        read_gdc_star_folder(tmp_path / "empty")


def test_bulk_table_orientation(tmp_path):
    rng = np.random.default_rng(0)
    genes = ["TSPAN6", "TNMD", "DPM1", "SCYL3", "FGR", "CFH"]
    samples = ["TCGA-AB-1000-01A", "TCGA-AB-1001-01A", "TCGA-AB-1002-11A"]
    m = rng.integers(0, 100, size=(len(genes), len(samples)))
    pd.DataFrame(m, index=genes, columns=samples).to_csv(tmp_path / "gxs.csv")
    a = read_bulk_table(tmp_path / "gxs.csv")
    assert a.uns["cpnn_input"]["orientation"] == "genes_x_samples"
    assert "TCGA" in a.uns["cpnn_input"]["orientation_reason"]
    assert list(a.obs_names) == samples and list(a.var_names) == genes
    np.testing.assert_array_equal(a.X.toarray(), m.T)
    ens = [f"ENSG{1000000 + i:011d}.3" for i in range(6)]
    pd.DataFrame(m.T, index=["s1", "s2", "s3"], columns=ens).to_csv(tmp_path / "sxg.tsv", sep="\t")
    b = read_bulk_table(tmp_path / "sxg.tsv")
    assert b.uns["cpnn_input"]["orientation"] == "samples_x_genes" and "Ensembl" in b.uns["cpnn_input"]["orientation_reason"]
    np.testing.assert_array_equal(b.X.toarray(), m.T)
    # labels alike and similar sizes: refuse to guess, then obey the caller
    pd.DataFrame(m[:3], index=["a1", "a2", "a3"], columns=["b1", "b2", "b3"]).to_csv(tmp_path / "amb.csv")
    with pytest.raises(CPNNInputError, match="cannot tell which axis"):
        read_bulk_table(tmp_path / "amb.csv")
    c = read_bulk_table(tmp_path / "amb.csv", orientation="samples_x_genes")
    assert list(c.var_names) == ["b1", "b2", "b3"]


def test_bulk_table_dups_tpm_h5ad(tmp_path):
    df = pd.DataFrame([[1.5, 2.0, 3.0], [0.5, 1.0, 2.0]], index=["s1", "s2"], columns=["ACTB", "ACTB", "GAPDH"])
    df.to_csv(tmp_path / "t.csv")
    with pytest.raises(CPNNInputError, match="non-integer"):
        read_bulk_table(tmp_path / "t.csv", orientation="samples_x_genes")
    with pytest.warns(UserWarning, match="duplicated"):
        a = read_bulk_table(tmp_path / "t.csv", orientation="samples_x_genes", require_counts=False)
    assert list(a.var_names) == ["ACTB", "GAPDH"]
    np.testing.assert_allclose(a.X.toarray(), [[3.5, 3.0], [1.5, 2.0]])
    df.assign(kind="x").to_csv(tmp_path / "annot.csv")
    with pytest.raises(CPNNInputError, match=r"1 non-numeric column\(s\), e\.g\. \['kind'\]"):
        read_bulk_table(tmp_path / "annot.csv")
    h = ad.AnnData(X=np.array([[1, 2], [3, 4]], np.float32), obs=pd.DataFrame(index=["s1", "s2"]),
                   var=pd.DataFrame(index=["G1", "G2"]))
    h.write_h5ad(tmp_path / "b.h5ad")
    b = read_bulk_table(tmp_path / "b.h5ad")
    np.testing.assert_array_equal(b.X.toarray(), [[1, 2], [3, 4]])


# ---------------------------------------------------------------------- TCGA barcodes
def test_parse_barcodes():
    b = parse_tcga_barcode("/data/wsi/tcga-cr-7395-01a-01-ts1.svs")
    assert (b.patient, b.sample, b.portion, b.slide, b.analyte) == (
        "TCGA-CR-7395", "TCGA-CR-7395-01A", "01", "TS1", None)
    assert b.is_slide and b.sample_type_name == "Primary Solid Tumor"
    a = parse_tcga_barcode("TCGA-CR-7395-01A-11R-2016-07")
    assert (a.tss, a.participant, a.sample_type, a.vial, a.portion, a.analyte, a.plate, a.center) == (
        "CR", "7395", "01", "A", "11", "R", "2016", "07")
    assert not a.is_slide
    assert patient_id("TCGA-CR-7395-01A-01-TS1.3f2c1e2a-aaaa-bbbb.svs") == "TCGA-CR-7395"
    assert sample_id("TCGA-BH-A0BZ-11A-61-DX1") == "TCGA-BH-A0BZ-11A"
    assert parse_tcga_barcode("TCGA-BH-A0BZ").sample is None
    with pytest.raises(CPNNInputError, match="no sample part"):
        sample_id("TCGA-BH-A0BZ")
    for bad in ("CMU-1-Small-Region.svs", "TCGA-CR", "TCGA-CR-7395-1A"):
        with pytest.raises(CPNNInputError, match="not a TCGA barcode"):
            parse_tcga_barcode(bad)


def test_real_tcga_slide_name():
    from cpnn.utils import find_data_dir

    data = find_data_dir()
    if data is None or not (data / "wsi").is_dir():
        pytest.skip("real data folder (../shared/data/wsi) not found")
    names = sorted(p.name for p in (data / "wsi").glob("tcga-*.svs"))
    assert names, "expected the TCGA slide fixture in ../shared/data/wsi"
    m = match_slides_to_samples(names, ["TCGA-CR-7395-01A-11R-A32Z-07"])
    assert m.loc[0, "sample"] == "TCGA-CR-7395-01A-11R-A32Z-07" and m.loc[0, "match"] == "sample_vial"


def test_match_slides_to_samples():
    slides = [
        "TCGA-CR-7395-01A-01-TS1.aaaa.svs",   # exact vial A
        "TCGA-CR-7395-01A-01-BS1.bbbb.svs",   # same sample, second slide
        "TCGA-CV-5430-01B-01-TS1.cccc.svs",   # bulk only has vial A -> sample-type fallback
        "TCGA-CV-5430-11A-01-TS1.dddd.svs",   # normal tissue: no bulk
        "cmu-1-small-region.svs",             # not a barcode
        "custom_slide_7.svs",                 # mapped by the table
    ]
    samples = ["TCGA-CR-7395-01A-11R-2016-07", "TCGA-CV-5430-01A", "TCGA-XX-0001-01A", "S7"]
    with pytest.warns(UserWarning, match=r"2 of 6 slide\(s\) without a bulk sample.*1 of 4 bulk"):
        m = match_slides_to_samples(slides, samples, table={"custom_slide_7.svs": "S7"})
    got = dict(zip(m["slide"], zip(m["sample"], m["match"])))
    assert got[slides[0]] == ("TCGA-CR-7395-01A-11R-2016-07", "sample_vial")
    assert got[slides[1]] == ("TCGA-CR-7395-01A-11R-2016-07", "sample_vial")
    assert got[slides[2]] == ("TCGA-CV-5430-01A", "sample_type")
    assert got[slides[3]] == (None, "unmatched")
    assert got[slides[4]] == (None, "unparsed")
    assert got[slides[5]] == ("S7", "table")
    assert m.attrs["unmatched_samples"] == ["TCGA-XX-0001-01A"]
    assert m.attrs["unmatched_slides"] == [slides[3], slides[4]]
    assert m.loc[0, "patient"] == "TCGA-CR-7395" and m.loc[0, "slide_sample"] == "TCGA-CR-7395-01A"
    with pytest.raises(CPNNInputError, match="not a bulk sample"):
        match_slides_to_samples(slides[:1], samples, table=pd.DataFrame(
            {"slide": [slides[0]], "sample": ["nope"]}))
