"""Host-side torsion metadata for Frad's hybrid (torsion + Cartesian) noise.

Frad perturbs every rotatable torsion of a molecule with RDKit's ``SetDihedralDeg`` before adding
Cartesian noise (``docs/spec/frad.md`` §2). On device, :mod:`mspec.noise` only needs, per molecule,

* the rotatable torsions ``(i, j, k, l)`` chosen by Frad's rule (§2.2), and
* for each torsion, the boolean mask of the atoms that ``SetDihedralDeg`` moves (§2.3).

This module computes both once, offline, with RDKit and numpy. Bonds are not stored in the
datasets we use (QM9 from qm9pack ships XYZ + SMILES), so they are perceived from the geometry
(:func:`mol_from_xyz`). Molecules whose bonds cannot be perceived, or which have no rotatable
torsion, get ``T = 0`` torsions and therefore plain Coord noise, like Frad's fallbacks (§2.7).

Nothing here is imported by device code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import AllChem, rdDetermineBonds

__all__ = [
    "ROTATABLE_SMARTS",
    "STATUS_OK",
    "STATUS_NO_TORSION",
    "STATUS_PERCEPTION_FAILED",
    "mol_from_xyz",
    "find_torsions",
    "moving_masks",
    "torsion_metadata",
]

# Frad's rotatable-bond pattern: a single, non-ring bond between two atoms that are neither
# terminal (explicit degree 1, hydrogens count when they are explicit atoms) nor in a triple bond.
ROTATABLE_SMARTS = "[!$(*#*)&!D1]-&!@[!$(*#*)&!D1]"
_ROTATABLE_PATTERN = Chem.MolFromSmarts(ROTATABLE_SMARTS)

STATUS_OK = "ok"
STATUS_NO_TORSION = "no_rotatable_torsion"
STATUS_PERCEPTION_FAILED = "bond_perception_failed"

# Covalent-radius factors tried, in order, by the SMILES-template fallback with the van der Waals
# connectivity method. The default connect-the-dots method (and covFactor 1.3) adds a spurious
# bond across small strained cages (bicyclo[1.1.1]pentanes, bicyclobutanes, oxetane-fused rings),
# whose 1,3 distances are short; that is why DetermineBonds fails on ~6% of QM9. Shrinking the
# factor removes the spurious contact while keeping every real bond (checked against the SMILES).
_FALLBACK_COV_FACTORS = (1.3, 1.25, 1.2, 1.15, 1.1, 1.05)


def _bare_mol(atomic_numbers: Sequence[int], positions: np.ndarray) -> Chem.Mol:
    """A bond-less molecule with the atoms in the given order and one 3D conformer."""
    rw = Chem.RWMol()
    for z in atomic_numbers:
        rw.AddAtom(Chem.Atom(int(z)))
    conf = Chem.Conformer(len(atomic_numbers))
    for idx, xyz in enumerate(positions):
        conf.SetAtomPosition(idx, [float(c) for c in xyz])
    conf.Set3D(True)
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()


def _mol_from_template(
    atomic_numbers: Sequence[int], positions: np.ndarray, smiles: str
) -> Optional[Chem.Mol]:
    """Connectivity from the geometry, bond orders from the SMILES; None if they disagree."""
    template = Chem.MolFromSmiles(smiles)
    if template is None:
        return None
    # The xyz atoms include every hydrogen, so the template must carry them as real atoms too,
    # otherwise the substructure match cannot cover the whole molecule.
    template = Chem.AddHs(template)
    if sorted(a.GetAtomicNum() for a in template.GetAtoms()) != sorted(
        int(z) for z in atomic_numbers
    ):
        return None
    attempts = [dict()] + [dict(useVdw=True, covFactor=f) for f in _FALLBACK_COV_FACTORS]
    for kwargs in attempts:
        mol = _bare_mol(atomic_numbers, positions)
        try:
            rdDetermineBonds.DetermineConnectivity(mol, **kwargs)
            # Equal bond counts + a full substructure match of the template (done inside
            # AssignBondOrdersFromTemplate) = the two graphs are isomorphic. Without the count
            # check a spurious extra bond would survive as a single bond and create a fake ring.
            if mol.GetNumBonds() != template.GetNumBonds():
                continue
            mol = AllChem.AssignBondOrdersFromTemplate(template, mol)
            Chem.SanitizeMol(mol)
            return mol
        except Exception:  # RDKit raises ValueError, RuntimeError and its own exception types.
            continue
    return None


def mol_from_xyz(
    atomic_numbers: Sequence[int],
    positions: np.ndarray,
    smiles: Optional[str] = None,
    charge: int = 0,
) -> Optional[Chem.Mol]:
    """Builds an explicit-H RDKit molecule from an XYZ geometry and perceives its bonds.

    The atoms keep the given order (atom ``n`` of the result is row ``n`` of ``positions``) and the
    molecule has one conformer holding ``positions``.

    Bonds are perceived with ``rdDetermineBonds.DetermineBonds(mol, charge=charge)`` (connectivity
    and bond orders from the geometry alone). If that fails and ``smiles`` is given, the
    connectivity is perceived with ``DetermineConnectivity`` and the bond orders are copied from
    the SMILES with ``AllChem.AssignBondOrdersFromTemplate`` (hydrogens added to the template). The
    template path is only accepted when the perceived graph is isomorphic to the SMILES graph; if
    the default connectivity method adds a spurious bond (strained cages), a few smaller
    van der Waals covalent-radius factors are tried before giving up.

    Args:
        atomic_numbers: ``[n_atoms]`` integer atomic numbers, hydrogens included.
        positions: ``[n_atoms, 3]`` coordinates in Å.
        smiles: optional SMILES of the same molecule, used only by the fallback.
        charge: total molecular charge passed to ``DetermineBonds``.

    Returns:
        A sanitised ``Chem.Mol`` with explicit hydrogen atoms and one conformer, or ``None`` when
        the bonds cannot be perceived. RDKit exceptions never leak out; RDKit log messages are
        blocked while this runs.
    """
    atomic_numbers = [int(z) for z in np.asarray(atomic_numbers).reshape(-1)]
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(atomic_numbers) != len(positions) or not np.all(np.isfinite(positions)):
        return None
    with rdBase.BlockLogs():
        try:
            mol = _bare_mol(atomic_numbers, positions)
            rdDetermineBonds.DetermineBonds(mol, charge=int(charge))
            # embedChiral=True (the default) already sanitises; be explicit, since the torsion
            # search needs ring information and explicit degrees.
            Chem.SanitizeMol(mol)
            return mol
        except Exception:
            pass
        if smiles:
            try:
                return _mol_from_template(atomic_numbers, positions, smiles)
            except Exception:
                return None
    return None


def find_torsions(mol: Chem.Mol) -> np.ndarray:
    """Rotatable torsions by Frad's rule (``docs/spec/frad.md`` §2.2).

    For every match ``(j, k)`` of :data:`ROTATABLE_SMARTS` (RDKit match order, one per bond):

    * ``i`` = the other end of the first bond of ``j`` (RDKit bond order) that is not ``j-k``;
      only this first candidate is ever tried;
    * ``l`` = the other end of the first bond of ``k`` that is neither ``j-k`` nor ``i-j`` and
      with ``l != i`` (a 3-ring guard that cannot fire for a non-ring bond);
    * if ``l`` is a ring atom the torsion is stored reversed, ``(l, k, j, i)``, which makes the
      ``j`` side (usually the non-ring substituent) the side that moves; else ``(i, j, k, l)``.

    Args:
        mol: a sanitised molecule. Pass the explicit-H molecule for Frad pre-training
            (``addh: true``): hydrogens then count in the degree and can be end atoms.

    Returns:
        ``[T, 4] int32`` atom indices; ``T = 0`` when nothing is rotatable.
    """
    torsions = []
    for match in mol.GetSubstructMatches(_ROTATABLE_PATTERN):
        j, k = int(match[0]), int(match[1])
        jk_bond = mol.GetBondBetweenAtoms(j, k).GetIdx()
        j_bonds = [b for b in mol.GetAtomWithIdx(j).GetBonds() if b.GetIdx() != jk_bond]
        if not j_bonds:
            continue
        ij_bond = j_bonds[0]  # Frad breaks after the first candidate for i.
        i = ij_bond.GetOtherAtomIdx(j)
        for kl_bond in mol.GetAtomWithIdx(k).GetBonds():
            if kl_bond.GetIdx() in (jk_bond, ij_bond.GetIdx()):
                continue
            l = kl_bond.GetOtherAtomIdx(k)
            if l == i:
                continue
            if mol.GetAtomWithIdx(l).IsInRing():
                torsions.append((l, k, j, i))
            else:
                torsions.append((i, j, k, l))
            break
    return np.asarray(torsions, dtype=np.int32).reshape(-1, 4)


def moving_masks(mol: Chem.Mol, torsions: np.ndarray) -> np.ndarray:
    """Atoms moved by ``SetDihedral(i, j, k, l, ...)`` for each torsion.

    RDKit rotates every atom reachable from ``k`` without passing through ``j``: the ``k`` side of
    the cut bond ``j-k``. ``k`` itself is in the set (it lies on the axis, so it does not move) and
    ``j`` is not.

    Args:
        mol: the molecule the torsions were found on.
        torsions: ``[T, 4]`` atom indices ``(i, j, k, l)``.

    Returns:
        ``[T, n_atoms] bool``.

    Raises:
        ValueError: if some ``j-k`` is not a bond or is a ring bond (RDKit refuses those too: the
            "k side" would then be the whole molecule).
    """
    n_atoms = mol.GetNumAtoms()
    torsions = np.asarray(torsions, dtype=np.int64).reshape(-1, 4)
    neighbours = [[nb.GetIdx() for nb in atom.GetNeighbors()] for atom in mol.GetAtoms()]
    masks = np.zeros((len(torsions), n_atoms), dtype=bool)
    for t, (_, j, k, _) in enumerate(torsions):
        bond = mol.GetBondBetweenAtoms(int(j), int(k))
        if bond is None or bond.IsInRing():
            raise ValueError(f"torsion {t}: atoms {j}-{k} are not an acyclic bond")
        seen = masks[t]
        seen[k] = True
        stack = [int(k)]
        while stack:
            atom = stack.pop()
            for nb in neighbours[atom]:
                if nb != j and not seen[nb]:
                    seen[nb] = True
                    stack.append(nb)
    return masks


def torsion_metadata(
    atomic_numbers: Sequence[int],
    positions: np.ndarray,
    smiles: Optional[str] = None,
    charge: int = 0,
) -> dict:
    """Torsions and moving masks of one molecule, ready for the dataset builder.

    Args:
        atomic_numbers: ``[n_atoms]`` atomic numbers, hydrogens included.
        positions: ``[n_atoms, 3]`` coordinates in Å (the clean conformer).
        smiles: optional SMILES, used only if bond perception from the geometry fails.
        charge: total molecular charge.

    Returns:
        A dict with

        * ``torsions``: ``[T, 4] int32`` molecule-local atom indices ``(i, j, k, l)``;
        * ``moving``: ``[T, n_atoms] bool``, atoms moved when torsion ``t`` is set;
        * ``status``: ``"ok"``, ``"no_rotatable_torsion"`` or ``"bond_perception_failed"``. The
          last two come with ``T = 0``: those molecules get plain Coord noise.
    """
    n_atoms = int(np.asarray(atomic_numbers).size)
    empty = dict(
        torsions=np.zeros((0, 4), dtype=np.int32),
        moving=np.zeros((0, n_atoms), dtype=bool),
    )
    mol = mol_from_xyz(atomic_numbers, positions, smiles=smiles, charge=charge)
    if mol is None:
        return dict(empty, status=STATUS_PERCEPTION_FAILED)
    torsions = find_torsions(mol)
    if len(torsions) == 0:
        return dict(empty, status=STATUS_NO_TORSION)
    return dict(torsions=torsions, moving=moving_masks(mol, torsions), status=STATUS_OK)
