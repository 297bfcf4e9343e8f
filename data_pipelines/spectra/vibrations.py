"""GFN2-xTB vibrational spectra: geometry optimisation, finite-difference Hessian with dipoles (IR),
polarisability derivatives from uniform-field gradients (Raman), and Eckart-projected normal modes.

Units: internally atomic units (bohr, Eh, e*bohr, amu for masses). Results: wavenumbers in cm^-1,
IR intensities in km/mol, Raman activities in Å^4/amu (S = 45 a'^2 + 7 g'^2, the convention of
Gaussian/ORCA and QM9S).

Derivatives (docs/spec/data-notes.md §3.2): with g = dE/dx and E(F) = E0 - mu.F - 1/2 F.alpha.F,
  d mu_i / dx = -d g / dF_i           (not used; IR takes dipoles from the Hessian displacements)
  d alpha_ij / dx = -d^2 g / dF_i dF_j (19 field single points: 0, +-f e_i, and (+-f, +-f) pairs)
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import scipy.constants as sc
import scipy.optimize

from data_pipelines.spectra.xtb import FIELD_ACCURACY, GFN2

BOHR_ANGSTROM = sc.physical_constants["Bohr radius"][0] * 1e10  # Å per bohr
# sqrt(Eh / (bohr^2 amu)) expressed as a wavenumber: sqrt(lambda) * this = cm^-1 (about 5140.49).
AU_TO_CM1 = np.sqrt(sc.physical_constants["Hartree energy"][0]
                    / (sc.atomic_mass * sc.physical_constants["Bohr radius"][0] ** 2)) / (
                        2 * np.pi * sc.c * 100)
# (e/sqrt(amu))^2, the unit of |dmu/dQ|^2 in a.u. with Q in bohr*sqrt(amu), to km/mol:
# N_A pi / (3 c^2 4 pi eps0) (about 974.88).
IR_AU_TO_KM_MOL = (sc.N_A * np.pi / (3 * sc.c**2 * 4 * np.pi * sc.epsilon_0)
                   * sc.e**2 / sc.atomic_mass / 1000.0)
# (bohr^2/sqrt(amu))^2 -> Å^4/amu: the unit of (d alpha/dQ)^2 with alpha in bohr^3.
RAMAN_AU_TO_A4_AMU = BOHR_ANGSTROM**4

# Most abundant isotope masses (amu) of the QM9 elements plus common extras.
MASSES = {1: 1.00782503, 5: 11.0093054, 6: 12.0, 7: 14.0030740, 8: 15.9949146, 9: 18.9984032,
          14: 27.9769265, 15: 30.9737620, 16: 31.9720707, 17: 34.9688527, 35: 78.9183371,
          53: 126.904473}


class VibrationError(RuntimeError):
    """Vibrational analysis failed; `kind` is a short failure category for the report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class VibrationalSpectrum:
    positions_bohr: np.ndarray  # [n_atoms, 3] optimised geometry
    energy: float  # Eh at the optimised geometry
    freq_cm1: np.ndarray  # [n_modes] ascending; negative = imaginary
    ir_km_mol: np.ndarray  # [n_modes]
    raman_a4_amu: np.ndarray  # [n_modes]
    n_reoptimisations: int  # how many times a saddle point was left along an imaginary mode
    n_gradients: int  # GFN2 single points used (cost)


def masses_of(numbers) -> np.ndarray:
    """[n_atoms] isotope masses in amu; unknown elements are an error."""
    missing = sorted({int(z) for z in numbers if int(z) not in MASSES})
    if missing:
        raise VibrationError("bad input", f"no isotope mass for atomic number(s) {missing}")
    return np.array([MASSES[int(z)] for z in numbers])


def optimise(calc: GFN2, positions_bohr: np.ndarray, gtol: float = 1e-4,
             max_steps: int = 2000) -> tuple[np.ndarray, float, int]:
    """L-BFGS minimisation of the GFN2 energy.

    Args:
      positions_bohr: [n_atoms, 3] start.
      gtol: convergence threshold on the largest gradient component, Eh/bohr.

    Returns:
      (positions [n_atoms, 3] bohr, energy Eh, number of gradient evaluations).
    """
    count = 0

    def fun(x):
        nonlocal count
        count += 1
        sp = calc.compute(x.reshape(-1, 3))
        return sp.energy, sp.gradient.reshape(-1)

    res = scipy.optimize.minimize(fun, np.asarray(positions_bohr, np.float64).reshape(-1),
                                  jac=True, method="L-BFGS-B",
                                  options={"gtol": gtol, "ftol": 1e-14, "maxiter": max_steps,
                                           "maxcor": 30})
    grad_max = float(np.abs(res.jac).max())
    if grad_max > 10 * gtol:
        raise VibrationError("optimisation not converged",
                             f"GFN2 optimisation stopped with max |gradient| {grad_max:.2e} Eh/bohr "
                             f"after {res.nit} steps ({res.message})")
    return res.x.reshape(-1, 3), float(res.fun), count


def hessian_and_dipole_derivatives(calc: GFN2, positions_bohr: np.ndarray, step: float = 0.005):
    """Central finite differences of analytic gradients and of the dipole.

    Returns:
      hessian [3N, 3N] Eh/bohr^2 (symmetrised), dmu_dx [3N, 3] e (dipole derivative per Cartesian).
    """
    x0 = np.asarray(positions_bohr, np.float64).reshape(-1)
    n = x0.size
    hess = np.empty((n, n))
    dmu = np.empty((n, 3))
    for k in range(n):
        plus, minus = x0.copy(), x0.copy()
        plus[k] += step
        minus[k] -= step
        sp_p = calc.compute(plus.reshape(-1, 3))
        sp_m = calc.compute(minus.reshape(-1, 3))
        hess[k] = (sp_p.gradient.reshape(-1) - sp_m.gradient.reshape(-1)) / (2 * step)
        dmu[k] = (sp_p.dipole - sp_m.dipole) / (2 * step)
    return 0.5 * (hess + hess.T), dmu


def polarizability_derivatives(numbers, positions_bohr: np.ndarray, charge: int = 0,
                               field: float = 1e-3) -> np.ndarray:
    """d alpha_ij / dx from gradients under 19 uniform fields (one calculator per field).

    Returns:
      [3N, 3, 3] bohr^2 (alpha in bohr^3 per bohr), symmetric in the last two axes.
    """
    pos = np.asarray(positions_bohr, np.float64)

    def grad(fvec):
        calc = GFN2(numbers, pos, charge=charge, field=fvec, accuracy=FIELD_ACCURACY)
        return calc.compute(pos).gradient.reshape(-1)

    g0 = grad(np.zeros(3))
    d2g = np.empty((pos.size, 3, 3))
    eye = np.eye(3) * field
    for i in range(3):
        d2g[:, i, i] = (grad(eye[i]) - 2 * g0 + grad(-eye[i])) / field**2
    for i, j in itertools.combinations(range(3), 2):
        pp = grad(eye[i] + eye[j])
        pm = grad(eye[i] - eye[j])
        mp = grad(-eye[i] + eye[j])
        mm = grad(-eye[i] - eye[j])
        d2g[:, i, j] = d2g[:, j, i] = (pp - pm - mp + mm) / (4 * field**2)
    return -d2g


def polarizability(numbers, positions_bohr: np.ndarray, charge: int = 0,
                   field: float = 1e-3) -> np.ndarray:
    """Static GFN2 polarisability [3, 3] bohr^3 from central differences of the field dipole.

    Used by the tests (brute-force reference for `polarizability_derivatives`).
    """
    pos = np.asarray(positions_bohr, np.float64)
    alpha = np.empty((3, 3))
    for j in range(3):
        f = np.zeros(3)
        f[j] = field
        mu_p = GFN2(numbers, pos, charge=charge, field=f, accuracy=FIELD_ACCURACY).compute(pos).dipole
        mu_m = GFN2(numbers, pos, charge=charge, field=-f, accuracy=FIELD_ACCURACY).compute(pos).dipole
        alpha[:, j] = (mu_p - mu_m) / (2 * field)
    return 0.5 * (alpha + alpha.T)


def rigid_body_basis(positions_bohr: np.ndarray, masses: np.ndarray, tol: float = 1e-6):
    """Orthonormal mass-weighted translations and rotations (Eckart conditions).

    Returns:
      [3N, k] with k = 6, or 5 for a linear molecule (a rotation about the axis vanishes).
    """
    sqm = np.sqrt(masses)
    com = (masses[:, None] * positions_bohr).sum(0) / masses.sum()
    r = positions_bohr - com
    n = len(masses)
    vecs = []
    for a in range(3):
        t = np.zeros((n, 3))
        t[:, a] = sqm
        vecs.append(t.reshape(-1))
    for a in range(3):
        axis = np.zeros(3)
        axis[a] = 1.0
        vecs.append((np.cross(axis, r) * sqm[:, None]).reshape(-1))
    u, s, _ = np.linalg.svd(np.array(vecs).T, full_matrices=False)
    return u[:, s > tol * s.max()]


def normal_modes(hessian: np.ndarray, positions_bohr: np.ndarray, masses: np.ndarray):
    """Harmonic analysis with translations and rotations projected out.

    Args:
      hessian: [3N, 3N] Eh/bohr^2.
      positions_bohr: [N, 3]. masses: [N] amu.

    Returns:
      freq_cm1 [M] (ascending; imaginary modes negative), modes [3N, M]: orthonormal mass-weighted
      displacement vectors, M = 3N - 6 (3N - 5 if linear).
    """
    inv_sqm = np.repeat(1.0 / np.sqrt(masses), 3)
    h_mw = hessian * inv_sqm[:, None] * inv_sqm[None, :]
    rigid = rigid_body_basis(positions_bohr, masses)
    # Orthonormal basis of the complement of the rigid-body space: the internal coordinates.
    q, _ = np.linalg.qr(np.hstack([rigid, np.eye(h_mw.shape[0])]))
    internal = q[:, rigid.shape[1]:h_mw.shape[0]]
    evals, evecs = np.linalg.eigh(internal.T @ h_mw @ internal)
    freq = np.sign(evals) * np.sqrt(np.abs(evals)) * AU_TO_CM1
    return freq, internal @ evecs


def ir_intensities(dmu_dx: np.ndarray, modes: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """[M] km/mol from dipole derivatives [3N, 3] (e) and mass-weighted modes [3N, M]."""
    cart = modes * np.repeat(1.0 / np.sqrt(masses), 3)[:, None]  # dx/dQ, bohr per (bohr sqrt(amu))
    dmu_dq = cart.T @ dmu_dx  # [M, 3]
    return IR_AU_TO_KM_MOL * (dmu_dq**2).sum(1)


def raman_activities(dalpha_dx: np.ndarray, modes: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """[M] Å^4/amu, S = 45 a'^2 + 7 g'^2, from d alpha/dx [3N, 3, 3] (bohr^2)."""
    cart = modes * np.repeat(1.0 / np.sqrt(masses), 3)[:, None]
    da = np.einsum("km,kij->mij", cart, dalpha_dx)  # [M, 3, 3]
    mean = np.trace(da, axis1=1, axis2=2) / 3
    aniso2 = 0.5 * ((da[:, 0, 0] - da[:, 1, 1]) ** 2 + (da[:, 1, 1] - da[:, 2, 2]) ** 2
                    + (da[:, 2, 2] - da[:, 0, 0]) ** 2
                    + 6 * (da[:, 0, 1] ** 2 + da[:, 1, 2] ** 2 + da[:, 0, 2] ** 2))
    return RAMAN_AU_TO_A4_AMU * (45 * mean**2 + 7 * aniso2)


# tblite SCF accuracy for optimisation and Hessian. The default (1.0) leaves SCF noise in the
# finite differences: on a 19-atom QM9 molecule, up to 1.5 cm^-1 in frequencies and 8.7 km/mol
# (6 % of the strongest band) in IR intensities vs 0.01; 0.01 costs about 0.15 s more per molecule.
HESSIAN_ACCURACY = 0.01


def vibrational_spectrum(numbers, positions_angstrom, charge: int = 0, gtol: float = 1e-4,
                         imaginary_cutoff_cm1: float = -20.0, max_reoptimisations: int = 1,
                         displacement_bohr: float = 0.3,
                         scf_accuracy: float = HESSIAN_ACCURACY) -> VibrationalSpectrum:
    """Optimise, then IR and Raman sticks; leaves saddle points along imaginary modes.

    If the lowest frequency is below `imaginary_cutoff_cm1`, the geometry is displaced along that
    mode (largest atomic displacement `displacement_bohr`) and re-optimised, at most
    `max_reoptimisations` times. A mode still below the cutoff then raises VibrationError
    ("imaginary frequency left"). Modes between the cutoff and 0 (numerical noise of the
    finite-difference Hessian on flat rotors) are kept with their negative sign.
    """
    numbers = np.asarray(numbers, np.int32)
    masses = masses_of(numbers)
    calc = GFN2(numbers, np.asarray(positions_angstrom) / BOHR_ANGSTROM, charge=charge,
                accuracy=scf_accuracy)
    pos, energy, n_grad = optimise(calc, np.asarray(positions_angstrom) / BOHR_ANGSTROM, gtol)
    reopt = 0
    while True:
        hess, dmu = hessian_and_dipole_derivatives(calc, pos)
        n_grad += 2 * pos.size
        freq, modes = normal_modes(hess, pos, masses)
        if freq[0] >= imaginary_cutoff_cm1:
            break
        if reopt >= max_reoptimisations:
            raise VibrationError("imaginary frequency left",
                                 f"lowest GFN2 frequency {freq[0]:.1f} cm^-1 after {reopt} "
                                 "re-optimisation(s) along the imaginary mode")
        cart = (modes[:, 0] / np.repeat(np.sqrt(masses), 3)).reshape(-1, 3)
        cart *= displacement_bohr / np.linalg.norm(cart, axis=1).max()
        pos, energy, n = optimise(calc, pos + cart, gtol)
        n_grad += n
        reopt += 1
    dalpha = polarizability_derivatives(numbers, pos, charge=charge)
    n_grad += 19
    return VibrationalSpectrum(
        positions_bohr=pos, energy=energy, freq_cm1=freq,
        ir_km_mol=ir_intensities(dmu, modes, masses),
        raman_a4_amu=raman_activities(dalpha, modes, masses),
        n_reoptimisations=reopt, n_gradients=n_grad)
