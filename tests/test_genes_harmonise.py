"""Gene-symbol harmonisation and matching (cpnn.data.genes)."""
import numpy as np
import pytest

from cpnn.data.genes import GENE_ALIASES, harmonise_gene_symbols, looks_like_ensembl, match_genes
from cpnn.errors import CPNNInputError


def test_required_aliases_present():
    required = {"HMHA1": "ARHGAP45", "GNB2L1": "RACK1", "PVRL2": "NECTIN2", "MYEOV2": "COPS9",
                "C10orf54": "VSIR", "FAM46C": "TENT5C", "SEPT7": "SEPTIN7", "MARCH1": "MARCHF1",
                "KIAA0101": "PCLAF", "H2AFZ": "H2AZ1", "HIST1H4C": "H4C3"}
    for old, new in required.items():
        assert GENE_ALIASES[old] == new
    # one-to-one, no chains (a new symbol is never itself renamed)
    assert not set(GENE_ALIASES.values()) & set(GENE_ALIASES)
    assert len(set(GENE_ALIASES.values())) == len(GENE_ALIASES)


def test_harmonise_keeps_order_and_avoids_collisions():
    assert harmonise_gene_symbols(["HMHA1", "EPCAM", " SEPT7 ", "ENSG00000141510.17"]) == [
        "ARHGAP45", "EPCAM", "SEPTIN7", "ENSG00000141510"]
    # both old and new present: keep the old one as is rather than create a duplicate
    assert harmonise_gene_symbols(["HMHA1", "ARHGAP45"]) == ["HMHA1", "ARHGAP45"]


def test_match_genes_keeps_target_order_and_spelling():
    target = ["RACK1", "EPCAM", "NOTINREF", "ARHGAP45", "CD3E"]
    ref = ["CD3E", "HMHA1", "GNB2L1", "EPCAM", "PTPRC"]
    t_idx, r_idx, names = match_genes(target, ref)
    assert names == ["RACK1", "EPCAM", "ARHGAP45", "CD3E"]
    np.testing.assert_array_equal(t_idx, [0, 1, 3, 4])
    assert [ref[j] for j in r_idx] == ["GNB2L1", "EPCAM", "HMHA1", "CD3E"]


def test_match_genes_no_overlap_mentions_ensembl():
    with pytest.raises(CPNNInputError) as exc:
        match_genes(["ENSG00000119888", "ENSG00000105383"], ["EPCAM", "CD33"])
    msg = str(exc.value)
    assert "Ensembl" in msg and "EPCAM" in msg and "ENSG00000119888" in msg
    with pytest.raises(CPNNInputError, match="no gene is shared"):
        match_genes(["A1", "B2"], ["C3", "D4"])


def test_looks_like_ensembl():
    assert looks_like_ensembl(["ENSG00000119888.3", "ENSG00000105383"])
    assert not looks_like_ensembl(["EPCAM", "CD33"])
