"""UV-Vis sticks: a hybrid-DFT SCF with PySCF, then the simplified Tamm-Dancoff approximation.

sTDA (S. Grimme, J. Chem. Phys. 138, 244104 (2013)) with its published parameters, written from the
paper's equations:

  A_ia,jb = delta_ij delta_ab (e_a - e_i) + 2 (ia|jb)' - (ij|ab)'        (singlets)
  (pq|rs)' = sum_AB q_pq^A q_rs^B gamma_AB,   q_pq^A = sum_{mu in A} C'_mu p C'_mu q,  C' = S^1/2 C
  gamma^K_AB = (R_AB^alpha + eta_AB^-alpha)^(-1/alpha)          for (ia|jb)'
  gamma^J_AB = (R_AB^beta + (a_x eta_AB)^-beta)^(-1/beta)       for (ij|ab)'
  alpha = 1.42 + 0.48 a_x,  beta = 0.20 + 1.83 a_x,  eta_AB = (eta_A + eta_B) / 2,

with eta_A the chemical hardnesses of Ghosh and Islam (Int. J. Quantum Chem. 110, 1206 (2010)),
doubled, in Eh, as in the sTDA program. Configuration selection as in the paper: MOs inside the
window [e_LUMO - 2(1 + 0.8 a_x) E_thr, e_HOMO + 2(1 + 0.8 a_x) E_thr]; primary CSFs with
A_ia,ia <= E_thr; secondary CSFs whose second-order contribution
sum_P |A_uP|^2 / (A_uu - A_PP) exceeds 1e-4 Eh are added. Oscillator strengths in the length gauge
with exact dipole integrals: f = 2/3 w |sqrt(2) sum_ia X_ia <i|r|a>|^2.

Known bias (measured in docs/spectra.md): sTDA excitation energies differ from full TDA of the same
functional by a few tenths of an eV, state by state.
"""

from __future__ import annotations

import dataclasses

import numpy as np

HARTREE_EV = 27.211386245988
# Ghosh-Islam chemical hardness x 2, Eh (the values the sTDA program uses), by atomic number.
HARDNESS_EH = {1: 0.47259288, 2: 0.92203391, 3: 0.17452888, 4: 0.25700733, 5: 0.33949086,
               6: 0.42195412, 7: 0.50438193, 8: 0.58691863, 9: 0.66931351, 10: 0.75191607,
               11: 0.17964105, 12: 0.22157276, 13: 0.26348578, 14: 0.30539645, 15: 0.34734014,
               16: 0.38924725, 17: 0.43115670, 18: 0.47308269, 35: 0.43445776, 53: 0.38619804}
ALPHA1, ALPHA2, BETA1, BETA2 = 1.42, 0.48, 0.20, 1.83
PT_THRESHOLD_EH = 1e-4

# Exact-exchange fraction of the hybrids we allow (sTDA needs a_x).
EXACT_EXCHANGE = {"b3lyp": 0.20, "pbe0": 0.25, "b3lyp5": 0.20}


class UVError(RuntimeError):
    """UV step failed; `kind` is a short failure category for the report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class UVSpectrum:
    energy_ev: np.ndarray  # [n_states] ascending
    osc_strength: np.ndarray  # [n_states]
    n_csf: int  # configurations in the sTDA matrix
    scf_energy: float  # Eh


def run_scf(numbers, positions_angstrom, charge: int = 0, xc: str = "b3lyp",
            basis: str = "def2-svp", grid_level: int = 0, conv_tol: float = 1e-6,
            max_cycle: int = 100):
    """Closed-shell Kohn-Sham SCF with density fitting. Raises UVError("SCF not converged")."""
    from pyscf import dft, gto

    atoms = [(int(z), tuple(map(float, p))) for z, p in zip(numbers, positions_angstrom)]
    try:
        mol = gto.M(atom=atoms, basis=basis, charge=charge, spin=0, unit="Angstrom", verbose=0)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UVError("bad input", f"PySCF cannot build the molecule: {e}") from e
    mf = dft.RKS(mol, xc=xc).density_fit()
    mf.grids.level = grid_level
    mf.conv_tol = conv_tol
    mf.max_cycle = max_cycle
    mf.kernel()
    if not mf.converged:
        # One retry with level shifting and damping helps difficult cases cheaply.
        mf.level_shift = 0.25
        mf.damp = 0.3
        mf.kernel(mf.make_rdm1())
        if not mf.converged:
            raise UVError("SCF not converged",
                          f"{xc}/{basis} SCF not converged in {max_cycle} cycles (also with "
                          "level shift 0.25 and damping 0.3)")
    return mf


def _gamma(dist: np.ndarray, eta: np.ndarray, exponent: float) -> np.ndarray:
    """Damped Mataga-Nishimoto-Ohno-Klopman interaction, [n_atoms, n_atoms] Eh."""
    return (dist**exponent + eta ** (-exponent)) ** (-1.0 / exponent)


def stda_matrix_elements(mf, a_x: float):
    """Transition charges and damped Coulomb kernels of a converged closed-shell SCF.

    Returns a dict with q_ov [A, no, nv], q_oo [A, no, no], q_vv [A, nv, nv], gamma_k, gamma_j
    [A, A], e_occ [no], e_vir [nv], c_occ [nao, no], c_vir [nao, nv] (all MOs, before windowing).
    """
    mol = mf.mol
    missing = sorted({int(z) for z in mol.atom_charges() if int(z) not in HARDNESS_EH})
    if missing:
        raise UVError("bad input", f"no sTDA hardness for atomic number(s) {missing}")
    s = mol.intor("int1e_ovlp")
    w, v = np.linalg.eigh(s)
    s_half = (v * np.sqrt(w)) @ v.T
    occ = mf.mo_occ > 0
    c_lowdin = s_half @ mf.mo_coeff  # [nao, nmo]
    ao_atom = np.empty(mol.nao, dtype=np.int64)
    for a, (_, _, p0, p1) in enumerate(mol.aoslice_by_atom()):
        ao_atom[p0:p1] = a
    n_atoms = mol.natm

    def charges(c1, c2):  # [A, n1, n2]
        prod = c1[:, :, None] * c2[:, None, :]
        out = np.zeros((n_atoms,) + prod.shape[1:])
        np.add.at(out, ao_atom, prod)
        return out

    co, cv = c_lowdin[:, occ], c_lowdin[:, ~occ]
    coords = mol.atom_coords()  # bohr
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    eta_a = np.array([HARDNESS_EH[int(z)] for z in mol.atom_charges()])
    eta = 0.5 * (eta_a[:, None] + eta_a[None, :])
    alpha, beta = ALPHA1 + ALPHA2 * a_x, BETA1 + BETA2 * a_x
    q_vv = charges(cv, cv)
    gamma_j = _gamma(dist, a_x * eta, beta)
    return dict(
        q_ov=charges(co, cv), q_oo=charges(co, co), q_vv=q_vv,
        gq_vv=np.einsum("AB,Bab->Aab", gamma_j, q_vv),  # gamma_j contracted once, reused
        gamma_k=_gamma(dist, eta, alpha), gamma_j=gamma_j,
        e_occ=mf.mo_energy[occ], e_vir=mf.mo_energy[~occ],
        c_occ=mf.mo_coeff[:, occ], c_vir=mf.mo_coeff[:, ~occ])


def _coupling(el, rows_i, rows_a, cols_j, cols_b) -> np.ndarray:
    """Off-diagonal part 2 (ia|jb)' - (ij|ab)' for CSF lists (rows) x (cols), [n_rows, n_cols]."""
    q_ov, q_oo = el["q_ov"], el["q_oo"]
    k_rows = q_ov[:, rows_i, rows_a]  # [A, R]
    k_cols = el["gamma_k"] @ q_ov[:, cols_j, cols_b]  # [A, C]
    out = 2.0 * k_rows.T @ k_cols
    gq_vv = el["gq_vv"]
    # (ij|ab)' for each (row, col): sum_A q_oo^A[i_r, j_c] (gamma_j q_vv)^A[a_r, b_c]
    x = q_oo[:, rows_i][:, :, cols_j]  # [A, R, C]
    y = gq_vv[:, rows_a][:, :, cols_b]  # [A, R, C]
    out -= np.einsum("arc,arc->rc", x, y)
    return out


def stda(mf, a_x: float, e_thr_ev: float = 16.0, max_energy_ev: float | None = None) -> UVSpectrum:
    """sTDA singlet excitations of a converged closed-shell SCF `mf`.

    Args:
      a_x: fraction of exact exchange of the functional (0.20 for B3LYP).
      e_thr_ev: sTDA energy threshold E_thr (primary CSFs and MO window), eV.
      max_energy_ev: keep states up to this energy (default `e_thr_ev`).
    """
    max_energy_ev = e_thr_ev if max_energy_ev is None else max_energy_ev
    e_thr = e_thr_ev / HARTREE_EV
    el = stda_matrix_elements(mf, a_x)
    e_occ, e_vir = el["e_occ"], el["e_vir"]
    window = 2.0 * (1.0 + 0.8 * a_x) * e_thr
    occ_keep = np.nonzero(e_occ >= e_vir[0] - window)[0]
    vir_keep = np.nonzero(e_vir <= e_occ[-1] + window)[0]
    ii, aa = np.meshgrid(occ_keep, vir_keep, indexing="ij")
    ii, aa = ii.reshape(-1), aa.reshape(-1)  # all CSFs in the window
    q_ia = el["q_ov"][:, ii, aa]  # [A, n_csf]
    k_diag = np.einsum("an,ab,bn->n", q_ia, el["gamma_k"], q_ia)
    gq_vv_diag = np.einsum("aqq->aq", el["gq_vv"])  # [A, nv]
    j_diag = np.einsum("an,an->n", np.einsum("aii->ai", el["q_oo"])[:, ii], gq_vv_diag[:, aa])
    diag = e_vir[aa] - e_occ[ii] + 2.0 * k_diag - j_diag
    primary = diag <= e_thr
    if not primary.any():
        return UVSpectrum(np.zeros(0), np.zeros(0), 0, float(mf.e_tot))
    p_idx = np.nonzero(primary)[0]
    rest = np.nonzero(~primary)[0]
    selected = p_idx
    if rest.size:
        # Second-order importance of each non-primary CSF for the primary space.
        e2 = np.zeros(rest.size)
        for chunk in np.array_split(np.arange(rest.size), max(1, rest.size // 512)):
            u = rest[chunk]
            a_up = _coupling(el, ii[u], aa[u], ii[p_idx], aa[p_idx])  # [U, P]
            e2[chunk] = (a_up**2 / (diag[u][:, None] - diag[p_idx][None, :])).sum(1)
        selected = np.concatenate([p_idx, rest[e2 > PT_THRESHOLD_EH]])
    si, sa = ii[selected], aa[selected]
    amat = _coupling(el, si, sa, si, sa)
    amat[np.diag_indices_from(amat)] = diag[selected]
    omega, x = np.linalg.eigh(amat)
    keep = omega * HARTREE_EV <= max_energy_ev
    omega, x = omega[keep], x[:, keep]
    # Length-gauge transition dipoles with exact integrals (origin: centre of nuclear charge).
    mol = mf.mol
    charges = mol.atom_charges()
    centre = charges @ mol.atom_coords() / charges.sum()
    with mol.with_common_orig(centre):
        r_ao = mol.intor_symmetric("int1e_r")  # [3, nao, nao]
    r_ia = np.einsum("xmn,mi,na->xia", r_ao, el["c_occ"], el["c_vir"])[:, si, sa]  # [3, n_sel]
    tdm = np.sqrt(2.0) * r_ia @ x  # [3, n_states]
    osc = 2.0 / 3.0 * omega * (tdm**2).sum(0)
    return UVSpectrum(energy_ev=omega * HARTREE_EV, osc_strength=osc, n_csf=int(selected.size),
                      scf_energy=float(mf.e_tot))


def uv_spectrum(numbers, positions_angstrom, charge: int = 0, xc: str = "b3lyp",
                basis: str = "def2-svp", e_thr_ev: float = 16.0,
                max_energy_ev: float = 15.0) -> UVSpectrum:
    """SCF + sTDA sticks up to `max_energy_ev` (CSF threshold `e_thr_ev`)."""
    if xc.lower() not in EXACT_EXCHANGE:
        raise ValueError(f"unknown exact-exchange fraction for {xc!r}; known: "
                         f"{sorted(EXACT_EXCHANGE)}")
    mf = run_scf(numbers, positions_angstrom, charge=charge, xc=xc, basis=basis)
    return stda(mf, EXACT_EXCHANGE[xc.lower()], e_thr_ev=e_thr_ev, max_energy_ev=max_energy_ev)
