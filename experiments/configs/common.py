"""Shared pieces of the experiment configs: argument parsing and the default blocks."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"variant"`` or ``"key=value,flag"`` config arguments (``path.py:ARG``).

    A bare word that is not a known key selects ``variant``; ``flag`` alone sets a boolean key.
    Unknown keys are an error, so a typo never silently selects the default.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            if key in defaults and isinstance(defaults[key], bool):
                out[key] = True
                continue
            if "variant" in defaults:
                out.variant = key
                continue
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        out[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return out


def model_config(size: str = "qm9") -> ml_collections.ConfigDict:
    """The ET encoder with scalar + noise heads.

    ``qm9``: the QM9/pre-training track (H=256, 8 layers, 64 RBF, per-layer affine LayerNorm +
    EqLN; 7,216,388 parameters). ``md17``: the MD17 track (H=128, 6 layers, 32 RBF, no per-layer
    norms; 1,426,564 parameters). ``tiny``: for CPU smoke runs.
    """
    sizes = {
        "qm9": dict(hidden=256, num_layers=8, num_rbf=64, interlayer_norm="affine"),
        "md17": dict(hidden=128, num_layers=6, num_rbf=32, interlayer_norm="none"),
        "tiny": dict(hidden=64, num_layers=2, num_rbf=16, interlayer_norm="affine"),
    }
    if size not in sizes:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(sizes)}")
    return ml_collections.ConfigDict(
        dict(
            # The backbone (mspec.models.ENCODERS): "et" (the Equivariant Transformer) or
            # "painn" (PaiNN; reads hidden, num_layers, num_rbf, cutoff, max_z, shared_filters
            # and ignores the ET-only keys num_heads, interlayer_norm, vector_norm,
            # message_passing).
            name="et",
            num_heads=8,
            cutoff=5.0,
            max_z=100,
            # Property head ("scalar", "dipole" or "spatial_extent") and/or the "noise" head
            # (mspec.models.Model).
            heads=("scalar", "noise"),
            # Final norm on the vectors: "whitened" (the forks' EqLN) or "none" (upstream
            # torchmd-net's ET, e.g. a converted torchmd-net checkpoint).
            vector_norm="whitened",
            # "none" or "atomref": learnable per-element offsets added to the scalar head's
            # atom contributions (torchmd-net's Atomref prior; zero-initialised).
            prior="none",
            # Frad's MD17 recipe: the energy head reads the vectors before the final whitened
            # norm, the noise head the normalised ones.
            separate_noise_vectors=False,
            # PaiNN only: one filter network for all message blocks (the paper) instead of one
            # per block (schnetpack's default); an error with the ET.
            shared_filters=False,
            # "xla" | "fused" | "auto" (mspec.kernels.message): XLA ops, the fused CPU kernels
            # (first and second derivatives), or the kernels where they run and XLA elsewhere.
            message_passing="xla",
            # Compute dtype (mspec.models.precision): "float32", or "bfloat16" for accelerators
            # (bfloat16 matmuls and messages; float32 parameters, norms, sums and outputs; the
            # fused CPU kernels are float32 only, so "auto" then runs XLA ops).
            dtype="float32",
            **sizes[size],
        )
    )


def data_config(dataset: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            # Where TFDS datasets live; empty means $MSPEC_DATA_DIR or ~/tensorflow_datasets.
            data_dir="",
            # Directory with the user's raw release files, for builders that need them
            # (qm9/xyz, qm9/pyg, qm9s/release, pcqm4mv2/*; see docs/datasets.md). Used only
            # when the dataset is not prepared yet.
            source_dir="",
            # Neighbour lists are built in the pipeline with cutoff + skin, so they stay valid
            # after the on-device noise; the step re-applies the exact cutoff.
            skin=0.5,
            max_neighbors=32,
            # Static per-device budgets are sized for this many molecules per device (the last
            # slot is padding); nodes/edges get `budget_slack` x the mean molecule.
            budget_slack=1.1,
            prefetch=4,
            # Featurisation (neighbour lists) in grain reader threads / worker processes; 0 = in
            # the packing thread. The batches and resume position do not depend on these.
            num_threads=0,
            num_workers=0,
            # Validation uses the first `eval_max_molecules` molecules of the split (0 = all).
            eval_max_molecules=2000,
            eval_split="validation",
        )
    )

