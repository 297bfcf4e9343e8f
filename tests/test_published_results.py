"""The published numbers in mspec/training/targets.py equal the tables of docs/spec/published-results.md.

The fine-tuning report prints ``PUBLISHED_QM9`` and ``PUBLISHED_MD17_FORCES`` beside measured
MAEs; the documented tables are the reference they were copied from, so every value the code holds
must appear, identical, in the table of the same paper.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mspec.training import targets

DOC = Path(__file__).resolve().parents[1] / "docs/spec/published-results.md"

# Table column header -> the code's QM9 target / MD17 molecule name.
COLUMNS = {
    "μ (D)": "mu", "α (a₀³)": "alpha", "HOMO": "homo", "LUMO": "lumo", "gap": "gap",
    "⟨R²⟩ (a₀²)": "r2", "ZPVE": "zpve", "U0": "U0", "U": "U", "H": "H", "G": "G",
    "Cv (cal/mol·K)": "cv", "salicylic acid": "salicylic",
}
# (section, table row) for each method name the code uses.
QM9_ROWS = {
    "MolSpectra": ("1.1", "MolSpectra"),
    "Coord (MolSpectra table)": ("1.1", "Coord"),
    "TorchMD-Net": ("1.1", "TorchMD-Net"),
    "Frad": ("1.2", "Frad"),
    "Coord (Frad table)": ("1.2", "DP-TorchMD-NET (τ = 0.04), i.e. Coord"),
}
MD17_SECTIONS = {9500: "3.1", 950: "3.2"}
MD17_ROWS = {"Frad": "Frad", "TorchMD-Net": "TorchMD-NET", "Coord": "DP-TorchMD-NET (Coord)"}


def doc_tables() -> dict[str, dict[str, dict[str, float]]]:
    """``{section: {row name: {column: value}}}`` for the first table under each ``###`` heading."""
    tables, section, header = {}, None, None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"###\s+(\d+(?:\.\d+)*)\s", line)
        if heading:
            section, header = heading.group(1), None
            continue
        if section is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [COLUMNS.get(c, c) for c in cells]
        elif not set(cells[0]) <= set("-: "):
            row = dict(zip(header[1:], (float(c.strip("*")) for c in cells[1:])))
            tables.setdefault(section, {})[cells[0].strip("*")] = row
    return tables


def test_qm9_numbers_match_the_documented_tables():
    tables = doc_tables()
    assert set(targets.PUBLISHED_QM9) == set(QM9_ROWS), "a method without a documented table row"
    for method, values in targets.PUBLISHED_QM9.items():
        section, row = QM9_ROWS[method]
        assert tables[section][row] == values, (method, section)


@pytest.mark.parametrize("frames", sorted(MD17_SECTIONS))
def test_md17_force_numbers_match_the_documented_tables(frames):
    table = doc_tables()[MD17_SECTIONS[frames]]
    for method, values in targets.PUBLISHED_MD17_FORCES[frames].items():
        assert table[MD17_ROWS[method]] == values, (frames, method)
    assert set(targets.PUBLISHED_MD17_FORCES) == set(MD17_SECTIONS)
