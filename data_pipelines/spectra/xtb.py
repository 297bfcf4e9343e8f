"""GFN2-xTB single points through tblite: energy, nuclear gradient and dipole, optionally under a
uniform electric field.

All quantities are atomic units (positions bohr, energy Eh, gradient Eh/bohr, dipole e*bohr, field
Eh/(e*bohr)). Sign convention of the field term (checked in docs/spec/data-notes.md §3.2 and in
the tests): E(F) = E0 - mu.F - 1/2 F.alpha.F, so mu = -dE/dF and alpha = dmu/dF.

tblite 0.8.0 wrapper bug: the field vector of the "electric-field" interaction must be passed as a
cffi `double*` pointing at a float64 array, which has to stay alive as long as the calculator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

METHOD = "GFN2-xTB"
# Tighter SCF than tblite's default accuracy 1.0: second field derivatives (Raman) need it.
FIELD_ACCURACY = 1e-3


class XTBError(RuntimeError):
    """The GFN2-xTB calculation failed (SCF not converged or the library raised)."""


@dataclasses.dataclass
class SinglePoint:
    energy: float  # Eh
    gradient: np.ndarray  # [n_atoms, 3] Eh/bohr
    dipole: np.ndarray  # [3] e*bohr


class GFN2:
    """A GFN2-xTB calculator bound to one molecule; reuses the last wavefunction as a guess.

    Args:
      numbers: [n_atoms] atomic numbers.
      positions: [n_atoms, 3] bohr (the starting geometry; `compute` takes new ones).
      charge: total molecular charge.
      field: [3] uniform electric field (a.u.) or None.
      accuracy: tblite SCF accuracy (smaller is tighter).
    """

    def __init__(self, numbers, positions, charge: int = 0, field=None, accuracy: float = 1.0):
        from tblite.interface import Calculator
        from tblite.library import ffi

        self.numbers = np.asarray(numbers, dtype=np.int32)
        pos = np.ascontiguousarray(positions, dtype=np.float64)
        try:
            self._calc = Calculator(METHOD, self.numbers, pos, charge=float(charge))
        except Exception as e:  # tblite raises its own TBLiteValueError types
            raise XTBError(f"cannot set up GFN2-xTB: {e}") from e
        self._calc.set("verbosity", 0)
        self._calc.set("accuracy", float(accuracy))
        self._field = None
        if field is not None:
            # Kept as an attribute: the library reads this memory (see module docstring).
            self._field = np.ascontiguousarray(field, dtype=np.float64).reshape(3)
            self._calc.add("electric-field", ffi.cast("double*", self._field.ctypes.data))
        self._restart = None

    def compute(self, positions) -> SinglePoint:
        """Single point at `positions` [n_atoms, 3] bohr."""
        pos = np.ascontiguousarray(positions, dtype=np.float64)
        self._calc.update(pos)
        try:
            self._restart = self._calc.singlepoint(self._restart)
        except Exception as e:
            # A failed SCF leaves a useless restart; start cold next time.
            self._restart = None
            raise XTBError(f"GFN2-xTB single point failed: {e}") from e
        res = self._restart
        return SinglePoint(
            energy=float(res.get("energy")),
            gradient=np.array(res.get("gradient"), dtype=np.float64).reshape(-1, 3),
            dipole=np.array(res.get("dipole"), dtype=np.float64).reshape(3),
        )
