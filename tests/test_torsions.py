"""Tests for data_pipelines/torsions.py: Frad's torsion rule, moving masks, bond perception."""

import csv
import functools
import os

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem, rdMolTransforms

from data_pipelines import torsions as tor

_SEED = 0xF00D


def _embedded(smiles):
    """Explicit-H molecule with one ETKDG conformer (fixed seed)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = _SEED
    assert AllChem.EmbedMolecule(mol, params) == 0, smiles
    return mol


def _xyz(mol):
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int32)
    return z, mol.GetConformer().GetPositions()


def _graph_smiles(mol):
    """Canonical heavy-atom SMILES without stereo (DetermineBonds assigns stereo from 3D)."""
    mol = Chem.Mol(mol)
    Chem.RemoveStereochemistry(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol))


def _skeleton_smiles(mol):
    """Canonical SMILES of the bare graph (all atoms incl. H, every bond single, no charges).

    Compares connectivity only: xyz2mol may legitimately pick another resonance / charge form of
    a zwitterion than the QM9 SMILES (e.g. QM9 #1642).
    """
    rw = Chem.RWMol(mol)
    for bond in rw.GetBonds():
        bond.SetBondType(Chem.BondType.SINGLE)
        bond.SetIsAromatic(False)
        bond.SetStereo(Chem.BondStereo.STEREONONE)
    for atom in rw.GetAtoms():
        atom.SetFormalCharge(0)
        atom.SetIsAromatic(False)
        atom.SetNoImplicit(True)
        atom.SetNumExplicitHs(0)
        atom.SetChiralTag(Chem.ChiralType.CHI_UNSPECIFIED)
    rw.UpdatePropertyCache(strict=False)
    return Chem.MolToSmiles(rw, isomericSmiles=False)


def _rotatable_bonds(torsions):
    return {frozenset((int(t[1]), int(t[2]))) for t in torsions}


# --------------------------------------------------------------------------------------------
# Torsion selection (Frad's rule, docs/spec/frad.md §2.2), on explicit-H molecules.

COUNTS = [
    ("CC", 1),  # ethane: the C-C rotor counts because H makes each C non-terminal (D=4)
    ("CCCC", 3),  # butane: two methyl rotors + the central bond
    ("c1ccccc1", 0),  # benzene: ring bonds and terminal C-H only
    ("C1CCCCC1", 0),  # cyclohexane
    ("Cc1ccccc1", 1),  # toluene: ring-methyl
    ("Oc1ccccc1", 1),  # phenol: ring-OH
    ("CCO", 2),  # ethanol: C-C and C-OH
    ("CC(N)=O", 2),  # acetamide: C-C and the amide C-N (no amide exclusion)
    ("CC#CC", 0),  # 2-butyne: both C-C ends are in a triple bond
    ("CC#N", 0),  # acetonitrile
    ("C=CC", 1),  # propene: only the sp2-sp3 single bond
    ("C=C", 0),  # ethylene: double bond
    ("c1ccc(cc1)-c1ccccc1", 1),  # biphenyl: aryl-aryl
    ("OC(=O)c1ccccc1", 2),  # benzoic acid: ring-COOH and C-OH
    ("O", 0),
    ("C", 0),
]


@pytest.mark.parametrize("smiles,count", COUNTS)
def test_torsion_counts(smiles, count):
    mol = _embedded(smiles)
    torsions = tor.find_torsions(mol)
    assert torsions.dtype == np.int32 and torsions.shape == (count, 4)
    # The same molecule rebuilt from its geometry alone finds the same rotatable bonds.
    z, pos = _xyz(mol)
    meta = tor.torsion_metadata(z, pos)
    assert meta["status"] == ("ok" if count else "no_rotatable_torsion")
    assert meta["torsions"].shape == (count, 4)
    assert meta["moving"].shape == (count, len(z)) and meta["moving"].dtype == bool
    if count:
        # Bond indices of a perceived molecule differ from the SMILES one, so i/l may differ;
        # the rotatable bonds may not.
        assert _rotatable_bonds(meta["torsions"]) == _rotatable_bonds(torsions)


def test_exact_tuples_follow_rdkit_bond_order():
    # Ethane (AddHs order: C0 C1 H2 H3 H4 | H5 H6 H7): i = first H of C0, l = first H of C1.
    np.testing.assert_array_equal(tor.find_torsions(_embedded("CC")), [[2, 0, 1, 5]])
    # Butane: the central torsion is the carbon chain itself.
    butane = tor.find_torsions(_embedded("CCCC"))
    assert [0, 1, 2, 3] in butane.tolist()
    assert _rotatable_bonds(butane) == {frozenset(b) for b in [(0, 1), (1, 2), (2, 3)]}
    # Toluene: whichever way the SMARTS matched, l is a ring atom, so the tuple is reversed to
    # (l, k, j, i) = (c2, c1, C0, H7) and the methyl side moves.
    mol = _embedded("Cc1ccccc1")
    t = tor.find_torsions(mol)
    np.testing.assert_array_equal(t, [[2, 1, 0, 7]])
    moving = tor.moving_masks(mol, t)
    assert sorted(np.flatnonzero(moving[0])) == [0, 7, 8, 9]


@pytest.mark.parametrize(
    "smiles", ["Cc1ccccc1", "Oc1ccccc1", "COc1ccccc1", "CCc1ccccc1", "CC1CCCCC1", "OC(=O)c1ccccc1"]
)
def test_ring_orientation_moves_the_substituent(smiles):
    """For a ring-substituent bond the ring orientation rule makes the substituent side move."""
    mol = _embedded(smiles)
    torsions = tor.find_torsions(mol)
    moving = tor.moving_masks(mol, torsions)
    ring = np.array([a.IsInRing() for a in mol.GetAtoms()])
    checked = 0
    for t, mask in zip(torsions, moving):
        if ring[t[1]] or ring[t[2]]:
            assert not np.any(mask & ring), (smiles, t)
            checked += 1
    assert checked == 1


def test_torsion_tuples_are_bonded_paths():
    for smiles in ["CCCC", "CC(N)=O", "COc1ccccc1", "OCC(O)C(=O)NC", "CC(C)(C)c1ccc(O)cc1"]:
        mol = _embedded(smiles)
        for i, j, k, l in tor.find_torsions(mol):
            assert len({i, j, k, l}) == 4
            for a, b in ((i, j), (j, k), (k, l)):
                assert mol.GetBondBetweenAtoms(int(a), int(b)) is not None
            jk = mol.GetBondBetweenAtoms(int(j), int(k))
            assert jk.GetBondType() == Chem.BondType.SINGLE and not jk.IsInRing()


# --------------------------------------------------------------------------------------------
# Moving masks = the atoms RDKit's SetDihedral moves.


@pytest.mark.parametrize("smiles", ["CCCC", "CC(N)=O", "COc1ccccc1", "OCC(O)C(=O)NC", "NCC#N"])
def test_moving_masks_match_rdkit(smiles):
    mol = _embedded(smiles)
    torsions = tor.find_torsions(mol)
    moving = tor.moving_masks(mol, torsions)
    assert moving.shape == (len(torsions), mol.GetNumAtoms())
    for (i, j, k, l), mask in zip(torsions.tolist(), moving):
        assert mask[k] and not mask[j] and mask[l] and not mask[i]
        conf = Chem.Conformer(mol.GetConformer())
        before = conf.GetPositions()
        rdMolTransforms.SetDihedralDeg(
            conf, i, j, k, l, rdMolTransforms.GetDihedralDeg(conf, i, j, k, l) + 40.0
        )
        changed = np.linalg.norm(conf.GetPositions() - before, axis=1) > 1e-8
        # Every changed atom is in the mask; k (on the axis) is the only mask atom that stays.
        assert not np.any(changed & ~mask)
        assert set(np.flatnonzero(mask & ~changed)) <= {k}


def test_moving_masks_reject_ring_bonds():
    mol = _embedded("C1CCCCC1")
    with pytest.raises(ValueError):
        tor.moving_masks(mol, np.array([[0, 1, 2, 3]]))


# --------------------------------------------------------------------------------------------
# Bond perception and statuses.


def test_bond_perception_failure_returns_status():
    z = np.array([6, 6, 6, 6, 1, 1], dtype=np.int32)
    cases = {
        "collapsed": np.zeros((6, 3)),  # every atom on one point
        "exploded": np.arange(18, dtype=np.float64).reshape(6, 3) * 10.0,  # no bonds at all
        "nan": np.full((6, 3), np.nan),
    }
    for name, pos in cases.items():
        assert tor.mol_from_xyz(z, pos) is None, name
        for smiles in (None, "C=CC=C", "not a smiles"):
            meta = tor.torsion_metadata(z, pos, smiles=smiles)
            assert meta["status"] == "bond_perception_failed", (name, smiles)
            assert meta["torsions"].shape == (0, 4) and meta["torsions"].dtype == np.int32
            assert meta["moving"].shape == (0, 6) and meta["moving"].dtype == bool


def test_mol_from_xyz_keeps_atom_order_and_geometry():
    mol = _embedded("OCC(O)C(=O)NC")
    z, pos = _xyz(mol)
    perceived = tor.mol_from_xyz(z, pos)
    assert perceived is not None
    np.testing.assert_array_equal([a.GetAtomicNum() for a in perceived.GetAtoms()], z)
    np.testing.assert_array_equal(perceived.GetConformer().GetPositions(), pos)
    assert _graph_smiles(perceived) == _graph_smiles(mol)


# --------------------------------------------------------------------------------------------
# Real QM9 molecules (qm9pack CSV, streamed; only the first rows are read).


def _qm9_csv(part=1):
    import qm9pack

    return os.path.join(os.path.dirname(qm9pack.__file__), "data", f"qm9_part{part}.csv")


def _parse_floats(text):
    # Fortran/Mathematica-style numbers ("0.", "-7.E-6") break json.loads
    # (docs/spec/data-notes.md §1).
    return np.array(
        [float(tok) for tok in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    )


@functools.lru_cache(maxsize=None)
def _qm9_rows(max_rows):
    """(index, smiles, z [n], positions [n, 3]) of the first `max_rows` QM9 molecules."""
    table = Chem.GetPeriodicTable()
    rows = []
    with open(_qm9_csv(), newline="") as f:
        for n, row in enumerate(csv.DictReader(f)):
            if n >= max_rows:
                break
            symbols = [s.strip(" '\"") for s in row["Elements"].strip("[]").split(",")]
            z = np.array([table.GetAtomicNumber(s) for s in symbols], dtype=np.int32)
            pos = _parse_floats(row["XYZ_Ang"]).reshape(-1, 3)
            assert len(z) == len(pos) == int(row["N_atoms"])
            rows.append((int(row["Index"]), row["SMILES"], z, pos))
    return tuple(rows)


def test_qm9_strained_cage_needs_smiles_fallback():
    """QM9 #2012, 1-ethylbicyclo[1.1.1]pentane: the default connectivity bonds the two bridgeheads
    (1.89 Å apart) and DetermineBonds fails; the SMILES-template fallback with a tighter vdW
    factor recovers the right graph."""
    (row,) = [r for r in _qm9_rows(2000) if r[0] == 2012]
    _, smiles, z, pos = row
    assert smiles == "CCC12CC(C1)C2"
    assert tor.torsion_metadata(z, pos)["status"] == "bond_perception_failed"
    meta = tor.torsion_metadata(z, pos, smiles=smiles)
    assert meta["status"] == "ok" and meta["torsions"].shape == (2, 4)
    mol = tor.mol_from_xyz(z, pos, smiles=smiles)
    assert _graph_smiles(mol) == Chem.CanonSmiles(smiles)
    np.testing.assert_array_equal(mol.GetConformer().GetPositions(), pos)


def test_qm9_perception_with_fallback():
    """On QM9 rows 1000-2000 every molecule is perceived once the SMILES fallback is allowed, and
    the perceived connectivity always agrees with the QM9 SMILES."""
    failed_without_smiles = 0
    rows = _qm9_rows(2000)[1000:]
    for index, smiles, z, pos in rows:
        mol = tor.mol_from_xyz(z, pos)
        if mol is None:
            failed_without_smiles += 1
            mol = tor.mol_from_xyz(z, pos, smiles=smiles)
        assert mol is not None, (index, smiles)
        reference = Chem.AddHs(Chem.MolFromSmiles(smiles))
        assert _skeleton_smiles(mol) == _skeleton_smiles(reference), (index, smiles)
    # Bicyclo[1.1.1]pentanes and friends: a few percent of QM9 (about 6% overall).
    assert 0 < failed_without_smiles < 0.15 * len(rows)
