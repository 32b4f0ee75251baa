"""Gene-symbol harmonisation between datasets annotated at different times.

Single-cell references and spatial / bulk count tables are often annotated with gene
symbols from different HGNC releases (``HMHA1`` in one, ``ARHGAP45`` in the other).
Matching on raw symbols then silently loses genes. :func:`harmonise_gene_symbols` maps
retired symbols to their current ones, and :func:`match_genes` intersects two gene lists
after harmonisation.

Only renames that are one-to-one and well established are listed; symbols that were
split, merged or reused for another gene are deliberately left out.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from cpnn.errors import CPNNInputError

__all__ = [
    "GENE_ALIASES",
    "harmonise_gene_symbols",
    "match_genes",
    "looks_like_ensembl",
]

_ALIASES_EXPLICIT: Dict[str, str] = {
    # seen between HER2ST / the Wu et al. atlas and current HGNC
    "HMHA1": "ARHGAP45",
    "GNB2L1": "RACK1",
    "MYEOV2": "COPS9",
    "ADRBK1": "GRK2",
    "ADRBK2": "GRK3",
    "MTL5": "TESMIN",
    "CCDC64": "BICDL1",
    # nectins
    "PVRL1": "NECTIN1",
    "PVRL2": "NECTIN2",
    "PVRL3": "NECTIN3",
    "PVRL4": "NECTIN4",
    # immune / stromal genes frequent in panels
    "C10orf54": "VSIR",
    "IL8": "CXCL8",
    "DARC": "ACKR1",
    "CCBP2": "ACKR2",
    "CXCR7": "ACKR3",
    "CCRL1": "ACKR4",
    "CYR61": "CCN1",
    "CTGF": "CCN2",
    "NOV": "CCN3",
    "WISP1": "CCN4",
    "WISP2": "CCN5",
    "WISP3": "CCN6",
    "PTRF": "CAVIN1",
    "SDPR": "CAVIN2",
    "PRKCDBP": "CAVIN3",
    "MURC": "CAVIN4",
    "LHFP": "LHFPL6",
    "KIAA1462": "JCAD",
    "C8orf4": "TCIM",
    "CECR1": "ADA2",
    "GPR30": "GPER1",
    "PPAP2A": "PLPP1",
    "PPAP2C": "PLPP2",
    "PPAP2B": "PLPP3",
    "GUCY1A3": "GUCY1A1",
    "GUCY1B3": "GUCY1B1",
    "FAM65A": "RIPOR1",
    "FAM65B": "RIPOR2",
    "FAM129A": "NIBAN1",
    "FAM129B": "NIBAN2",
    "FAM129C": "NIBAN3",
    "FAM46A": "TENT5A",
    "FAM46B": "TENT5B",
    "FAM46C": "TENT5C",
    "FAM46D": "TENT5D",
    "FAM101A": "RFLNA",
    "FAM101B": "RFLNB",
    "FAM96A": "CIAO2A",
    "FAM96B": "CIAO2B",
    "FAM105B": "OTULIN",
    "FAM134B": "RETREG1",
    "FAM213A": "PRXL2A",
    "FAM26F": "CALHM6",
    "FAM19A5": "TAFA5",
    "AIM1": "CRYBG1",
    "MLLT4": "AFDN",
    "ERBB2IP": "ERBIN",
    "C2orf40": "ECRG4",
    "C1orf106": "INAVA",
    "C11orf95": "ZFTA",
    "C19orf10": "MYDGF",
    "C14orf166": "RTRAF",
    "C17orf62": "CYBC1",
    "C17orf89": "NDUFAF8",
    "C1orf31": "COA6",
    "KIAA0101": "PCLAF",
    "KIAA1199": "CEMIP",
    "TMEM2": "CEMIP2",
    "LINC00152": "CYTOR",
    "AES": "TLE5",
    "HN1": "JPT1",
    "HN1L": "JPT2",
    "NGFRAP1": "BEX3",
    "TMEM66": "SARAF",
    "GLTSCR2": "NOP53",
    "WBSCR22": "BUD23",
    "SHFM1": "SEM1",
    "TCEB1": "ELOC",
    "TCEB2": "ELOB",
    "TCEB3": "ELOA",
    "SKIV2L2": "MTREX",
    "ERO1L": "ERO1A",
    "ERO1LB": "ERO1B",
    "PTPLAD1": "HACD3",
    "PTPLB": "HACD2",
    "LRRC16A": "CARMIL1",
    "SF3B14": "SF3B6",
    "MKI67IP": "NIFK",
    "CCDC109B": "MCUB",
    "ZNF259": "ZPR1",
    "TROVE2": "RO60",
    "CTSL1": "CTSL",
    "CTSL2": "CTSV",
    "B3GNT1": "B4GAT1",
    "GLT25D1": "COLGALT1",
    "APITD1": "CENPS",
    "SETD8": "KMT5A",
    "SUV420H1": "KMT5B",
    "WHSC1": "NSD2",
    "WHSC1L1": "NSD3",
    "UTP11L": "UTP11",
    "HDGFRP3": "HDGFL3",
    "TMEM110": "STIMATE",
    "TMEM194A": "NEMP1",
    "PYCRL": "PYCR3",
    # selenoproteins
    "SEPP1": "SELENOP",
    "SEPW1": "SELENOW",
    "SEP15": "SELENOF",
    "SELM": "SELENOM",
    "SELK": "SELENOK",
    "SELT": "SELENOT",
    "SEPN1": "SELENON",
    "SELS": "SELENOS",
    "SELH": "SELENOH",
    # adhesion GPCRs
    "GPR56": "ADGRG1",
    "GPR116": "ADGRF5",
    "GPR124": "ADGRA2",
    "GPR126": "ADGRG6",
    "CD97": "ADGRE5",
    "EMR1": "ADGRE1",
    "EMR2": "ADGRE2",
    "ELTD1": "ADGRL4",
    "LPHN1": "ADGRL1",
    "LPHN2": "ADGRL2",
    "LPHN3": "ADGRL3",
    "BAI1": "ADGRB1",
    "BAI2": "ADGRB2",
    "BAI3": "ADGRB3",
    # ATP synthase subunits (2018 renaming)
    "ATP5A1": "ATP5F1A",
    "ATP5B": "ATP5F1B",
    "ATP5C1": "ATP5F1C",
    "ATP5D": "ATP5F1D",
    "ATP5E": "ATP5F1E",
    "ATP5F1": "ATP5PB",
    "ATP5H": "ATP5PD",
    "ATP5J": "ATP5PF",
    "ATP5O": "ATP5PO",
    "ATP5I": "ATP5ME",
    "ATP5J2": "ATP5MF",
    "ATP5L": "ATP5MG",
    "ATP5G1": "ATP5MC1",
    "ATP5G2": "ATP5MC2",
    "ATP5G3": "ATP5MC3",
    # histones (2020 renaming)
    "H2AFZ": "H2AZ1",
    "H2AFV": "H2AZ2",
    "H2AFX": "H2AX",
    "H2AFJ": "H2AJ",
    "H2AFY": "MACROH2A1",
    "H2AFY2": "MACROH2A2",
    "H3F3A": "H3-3A",
    "H3F3B": "H3-3B",
    "H1F0": "H1-0",
    "HIST1H1A": "H1-1",
    "HIST1H1C": "H1-2",
    "HIST1H1D": "H1-3",
    "HIST1H1E": "H1-4",
    "HIST1H1B": "H1-5",
    "HIST1H1T": "H1-6",
    "HIST1H4C": "H4C3",
    "HIST1H2AC": "H2AC6",
    "HIST1H2BD": "H2BC5",
    "HIST1H2BK": "H2BC12",
}

# Septins (SEPT1 -> SEPTIN1 ...) and MARCH E3 ligases (MARCH1 -> MARCHF1 ...) were renamed
# because spreadsheets turn them into dates. SEPT13 is omitted: it became a pseudogene.
_ALIASES_SERIES: Dict[str, str] = {
    **{f"SEPT{i}": f"SEPTIN{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14)},
    **{f"MARCH{i}": f"MARCHF{i}" for i in range(1, 12)},
}

#: Retired HGNC symbol -> current symbol (one-to-one renames only).
GENE_ALIASES: Dict[str, str] = {**_ALIASES_EXPLICIT, **_ALIASES_SERIES}

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def looks_like_ensembl(names: Iterable[str], min_fraction: float = 0.5) -> bool:
    """Whether most of ``names`` are Ensembl gene ids (``ENSG00000141510`` etc.).

    Parameters
    ----------
    names
        Gene identifiers.
    min_fraction
        Fraction of names that must look like Ensembl ids.

    Returns
    -------
    bool
    """
    names = [str(n) for n in names]
    if not names:
        return False
    hits = sum(bool(_ENSEMBL_RE.match(n)) for n in names)
    return hits / len(names) >= min_fraction


def harmonise_gene_symbols(names: Iterable[str]) -> List[str]:
    """Map retired gene symbols to their current HGNC symbols.

    A symbol is renamed only when its new symbol is not itself present in ``names``;
    otherwise both would collide, and the original is kept unchanged. Whitespace around
    names is stripped and Ensembl version suffixes (``ENSG...12.3`` -> ``ENSG...12``)
    are removed, so ids from different annotation releases match.

    Parameters
    ----------
    names
        Gene symbols (or Ensembl ids) in any order.

    Returns
    -------
    list of str
        Same length and order as ``names``.
    """
    cleaned = []
    for n in names:
        s = str(n).strip()
        if _ENSEMBL_RE.match(s) and "." in s:
            s = s.split(".", 1)[0]
        cleaned.append(s)
    present = set(cleaned)
    out = []
    for s in cleaned:
        new = GENE_ALIASES.get(s)
        out.append(new if new is not None and new not in present else s)
    return out


def match_genes(
    target_genes: Sequence[str], reference_genes: Sequence[str]
) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Intersect two gene lists after symbol harmonisation, in the target's order.

    Parameters
    ----------
    target_genes
        Genes of the data to be modelled (e.g. a spatial panel); their order is kept.
    reference_genes
        Genes of the single-cell reference.

    Returns
    -------
    target_idx : numpy.ndarray of int
        Positions in ``target_genes`` of the shared genes (increasing).
    ref_idx : numpy.ndarray of int
        Matching positions in ``reference_genes``.
    names : list of str
        The shared genes spelled as in ``target_genes``. When a harmonised symbol occurs
        more than once on a side, its first occurrence is used.

    Raises
    ------
    CPNNInputError
        When no gene is shared.
    """
    target = [str(g) for g in target_genes]
    reference = [str(g) for g in reference_genes]
    t_h = harmonise_gene_symbols(target)
    r_h = harmonise_gene_symbols(reference)
    ref_pos: Dict[str, int] = {}
    for j, g in enumerate(r_h):
        ref_pos.setdefault(g, j)
    t_idx: List[int] = []
    r_idx: List[int] = []
    seen = set()
    for i, g in enumerate(t_h):
        j = ref_pos.get(g)
        if j is not None and g not in seen:
            seen.add(g)
            t_idx.append(i)
            r_idx.append(j)
    if not t_idx:
        t_ens, r_ens = looks_like_ensembl(target), looks_like_ensembl(reference)
        hint = "Check that both sides use the same kind of identifier and species."
        if t_ens != r_ens:
            which = "target" if t_ens else "reference"
            other = "reference" if t_ens else "target"
            hint = (
                f"The {which} genes look like Ensembl ids (ENSG...) while the {other} genes "
                "look like gene symbols; convert one side (e.g. use the gene-symbol column "
                "of features.tsv or var['gene_symbols'])."
            )
        raise CPNNInputError(
            f"no gene is shared between the target ({len(target)} genes, e.g. "
            f"{target[:5]}) and the reference ({len(reference)} genes, e.g. "
            f"{reference[:5]}), even after mapping retired symbols.",
            field="genes",
            fix=hint,
        )
    return np.asarray(t_idx, dtype=np.int64), np.asarray(r_idx, dtype=np.int64), [
        target[i] for i in t_idx
    ]
