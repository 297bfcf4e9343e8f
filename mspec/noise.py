"""Pure, jittable noise functions for denoising pre-training (Coord and Frad).

All functions act on **one device batch** in the layout of :mod:`mspec.types` (``N`` atom slots,
``G`` molecule slots, ``T`` torsion slots per molecule); the train step ``vmap``s them over the
leading device axis. They contain no host code and depend only on ``jax``.

* :func:`coord_noise`: isotropic Gaussian noise (Coord, and Frad's Cartesian part).
* :func:`rotate_torsions`: deterministic core, rotates every torsion ``t`` of every molecule by a
  given angle, exactly like RDKit's ``SetDihedralDeg(conf, i, j, k, l, current + angle)``.
* :func:`apply_torsion_noise`: draws the angles ``~ N(0, sigma_deg^2)`` and calls the core.
* :func:`frad_noise`: torsion noise, then Cartesian noise, with Frad's fractional target.

Why a sequential ``lax.scan`` over torsion slots (``docs/spec/data-notes.md`` §4): moving sets
of different torsions of one molecule are nested or overlap, so an inner torsion axis moves with an outer
rotation. Rotating torsion ``t`` about the *current* ``j -> k`` axis, one slot after the other, is
exactly what RDKit's loop of absolute ``SetDihedralDeg`` calls does (a rotation about one acyclic
bond never changes another torsion's dihedral, so each absolute set is a rotation by exactly its
noise). Molecules are independent, so all ``G`` molecules advance one slot per scan step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["coord_noise", "rotate_torsions", "apply_torsion_noise", "frad_noise"]


def coord_noise(rng, positions, node_mask, tau):
    """Isotropic Gaussian coordinate noise (Coord; Frad's Cartesian part).

    Args:
        rng: PRNG key.
        positions: ``[N, 3]`` float coordinates in Å.
        node_mask: ``[N] bool``, True for real atoms.
        tau: noise standard deviation in Å (scalar).

    Returns:
        ``(noisy, target)``, both ``[N, 3]`` with the dtype of ``positions``: ``noisy = positions +
        target`` with ``target ~ N(0, tau^2)`` per atom and axis. Padding rows get exactly ``+0.0``
        noise, so their ``noisy`` rows equal their input rows.
    """
    noise = tau * jax.random.normal(rng, positions.shape, dtype=positions.dtype)
    # where (not a multiply) so padding gets +0.0 rather than -0.0 / NaN-propagating products.
    noise = jnp.where(node_mask[:, None], noise, jnp.zeros_like(noise))
    return positions + noise, noise


def _rotation_step(node_graph, positions, slot):
    """Applies torsion slot ``t`` of every molecule to ``positions`` (one ``lax.scan`` step).

    ``slot`` holds, for that slot: ``atoms [G, 4]``, ``mask [G]``, ``moving [N]``, ``theta [G]``
    (radians). Atom ``n`` rotates iff ``moving[n]`` and its molecule's slot is real.
    """
    atoms, mask, moving, theta = slot
    p_j = positions[atoms[:, 1]]  # [G, 3] axis origin: the CURRENT position of j.
    p_k = positions[atoms[:, 2]]  # [G, 3]
    axis = p_k - p_j
    sq_norm = jnp.sum(axis * axis, axis=-1, keepdims=True)
    # Masked slots may point at any atom (often j == k == 0): avoid 0/0, the result is discarded.
    axis = axis / jnp.sqrt(jnp.where(sq_norm > 0, sq_norm, jnp.ones_like(sq_norm)))

    # Gather each molecule's axis, origin and angle onto its atoms: [N, 3], [N, 3], [N].
    u = axis[node_graph]
    origin = p_j[node_graph]
    angle = theta[node_graph]
    sin = jnp.sin(angle)[:, None]
    # 1 - cos(a) without cancellation for small angles (Frad's sigma is 2 degrees).
    one_minus_cos = 2.0 * jnp.square(jnp.sin(0.5 * angle))[:, None]

    # Rodrigues' formula, right-handed about u = (p_k - p_j)/|p_k - p_j|, written as a
    # displacement: R v = v + sin(a) u x v + (1 - cos(a)) u x (u x v). Adding a small displacement
    # to the current position (instead of rebuilding origin + R v) keeps float32 errors at the
    # size of the displacement's rounding, not of the coordinates'. With the moving atoms on the
    # k side this increases the RDKit dihedral (i, j, k, l) by exactly +a (checked against
    # SetDihedralDeg in tests/test_noise.py).
    v = positions - origin
    u_cross_v = jnp.cross(u, v)
    rotated = positions + sin * u_cross_v + one_minus_cos * jnp.cross(u, u_cross_v)

    move = moving & mask[node_graph]
    # where, so that atoms that do not move keep bit-identical coordinates.
    return jnp.where(move[:, None], rotated, positions), None


def rotate_torsions(positions, node_graph, torsion_atoms, torsion_mask, node_moving, angles_deg):
    """Rotates each torsion of each molecule by a given angle (deterministic core of the noise).

    For slot ``t = 0 .. T-1`` in order and all molecules at once: the axis goes through the current
    position of ``j`` with direction ``p_k - p_j``, and the atoms with ``node_moving[:, t]`` rotate
    about it by ``angles_deg[g, t]`` so that the dihedral ``(i, j, k, l)``, measured as RDKit does,
    increases by exactly that angle. The result equals RDKit's
    ``SetDihedralDeg(conf, i, j, k, l, original_t + angle_t)`` applied torsion by torsion in list
    order (``original_t`` measured before any change). Masked slots do nothing.

    Args:
        positions: ``[N, 3]`` float coordinates in Å. The computation runs in this dtype.
        node_graph: ``[N] int32`` molecule slot of each atom.
        torsion_atoms: ``[G, T, 4] int32`` torsions ``(i, j, k, l)`` as batch node indices.
        torsion_mask: ``[G, T] bool``, True for real torsions.
        node_moving: ``[N, T] bool``, atom moves when torsion ``t`` of its own molecule is set.
        angles_deg: ``[G, T]`` rotation angles in degrees.

    Returns:
        ``[N, 3]`` rotated coordinates, dtype of ``positions``. Atoms that no real torsion moves
        (including padding) are returned bit-identical.
    """
    theta = jnp.deg2rad(angles_deg.astype(positions.dtype))
    theta = jnp.where(torsion_mask, theta, jnp.zeros_like(theta))
    # Scan over the torsion-slot axis: [T, G, 4], [T, G], [T, N], [T, G].
    slots = (
        jnp.swapaxes(torsion_atoms, 0, 1),
        jnp.swapaxes(torsion_mask, 0, 1),
        jnp.swapaxes(node_moving, 0, 1),
        jnp.swapaxes(theta, 0, 1),
    )

    def step(pos, slot):
        return _rotation_step(node_graph, pos, slot)

    rotated, _ = jax.lax.scan(step, positions, slots)
    return rotated


def apply_torsion_noise(
    rng, positions, node_graph, torsion_atoms, torsion_mask, node_moving, sigma_deg
):
    """Frad's torsion noise: every rotatable torsion gets an independent ``N(0, sigma_deg^2)`` turn.

    Angles are drawn per (molecule slot, torsion slot) in the dtype of ``positions`` and applied by
    :func:`rotate_torsions` (sequentially over slots, see the module docstring).

    Args:
        rng: PRNG key.
        positions: ``[N, 3]`` float coordinates in Å.
        node_graph: ``[N] int32``.
        torsion_atoms: ``[G, T, 4] int32``.
        torsion_mask: ``[G, T] bool``.
        node_moving: ``[N, T] bool``.
        sigma_deg: torsion noise standard deviation in degrees (Frad: 2 for pre-training, 20 for
            MD17 fine-tuning).

    Returns:
        ``[N, 3]`` coordinates after the torsion changes (molecules without torsions unchanged).
    """
    angles = sigma_deg * jax.random.normal(rng, torsion_mask.shape, dtype=positions.dtype)
    return rotate_torsions(
        positions, node_graph, torsion_atoms, torsion_mask, node_moving, angles
    )


def frad_noise(
    rng,
    positions,
    node_mask,
    node_graph,
    torsion_atoms,
    torsion_mask,
    node_moving,
    sigma_deg,
    tau,
    fractional=True,
):
    """Frad's hybrid noise: torsion noise first, then Cartesian noise (``docs/spec/frad.md`` §2.4).

    Molecules with no real torsion slot (no rotatable bond, or bond perception failed) are left
    unchanged by the torsion part and so get plain Coord noise (Frad's fallback, §2.7).

    Args:
        rng: PRNG key (split internally into a torsion key and a Cartesian key).
        positions: ``[N, 3]`` clean coordinates in Å.
        node_mask: ``[N] bool``.
        node_graph: ``[N] int32``.
        torsion_atoms: ``[G, T, 4] int32``.
        torsion_mask: ``[G, T] bool``.
        node_moving: ``[N, T] bool``.
        sigma_deg: torsion noise std in degrees.
        tau: Cartesian noise std in Å.
        fractional: static Python bool. True (Frad, ``composition: true``): the target is only the
            Cartesian part, ``noisy - after_torsion``. False (the non-fractional "hybrid noise"
            ablation): the target is ``noisy - positions`` (torsion and Cartesian displacement).

    Returns:
        ``(noisy, target)``, both ``[N, 3]``; padding rows of both are 0 (when the padding rows of
        ``positions`` are 0, as in :mod:`mspec.types`).
    """
    rng_torsion, rng_coord = jax.random.split(rng)
    after_torsion = apply_torsion_noise(
        rng_torsion, positions, node_graph, torsion_atoms, torsion_mask, node_moving, sigma_deg
    )
    noisy, cartesian = coord_noise(rng_coord, after_torsion, node_mask, tau)
    if fractional:
        return noisy, cartesian
    return noisy, noisy - positions
