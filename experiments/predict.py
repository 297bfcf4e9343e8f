"""Predicts properties and embeddings of molecules with a trained model.

    python -m experiments.predict --workdir runs/ft_homo --smiles CCO,c1ccccc1 --out pred.csv
    python -m experiments.predict --workdir runs/ft_homo --sdf mols.sdf --out pred.npz --embeddings atom
    python -m experiments.predict --workdir runs/ft_aspirin --xyz frames.xyz --out pred.npz
    python -m experiments.predict --workdir runs/frad --qm9-index 1-100 --out emb.npz --embeddings molecule

Inputs (exactly one): ``--sdf`` (3D, explicit hydrogens), ``--xyz`` (multi-molecule, Å),
``--smiles`` (comma-separated) or ``--smiles-file`` (one per line; RDKit ETKDG + MMFF
conformer), ``--qm9-index`` (QM9 indices, e.g. ``1,5,10-20``; qm9pack geometries). Readers:
:mod:`data_pipelines.spectra.inputs`.

Output: ``--out FILE.csv`` (one row per molecule) or ``FILE.npz`` (also per-atom arrays): the
fine-tuned model's property in the papers' units (QM9: meV, D, a0^3, ...; MD17: energy in
kcal/mol and, in NPZ, forces in kcal/mol/Å), computed as ``experiments.evaluate`` does, and with
``--embeddings molecule|atom`` the encoder's representation (per molecule: the mean of the
per-atom features over the molecule's atoms). A pre-training workdir gives embeddings only.

A molecule that cannot be read or used (unparseable SMILES, no 3D coordinates, an element the
model was not trained on, a net charge, overlapping atoms, ...) is reported on stderr by record
and skipped; the summary line counts them, and the NPZ lists them (``skipped_record``,
``skipped_reason``). Exit status: 0, or 3 when molecules were skipped (0 with
``--allow_skips``), 1 with one ``error:`` line when nothing could be predicted, an input file
is missing or the workdir cannot serve the request, 2 for flag mistakes. Details:
docs/models.md, "Using a trained model".
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys

import numpy as np
from absl import app, flags, logging

from mspec.training import cli

EXIT_PARTIAL = 3  # as data_pipelines/spectra/run.py: some molecules were skipped

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A fine-tuning or pre-training workdir, or an experiments.convert output.")
flags.DEFINE_string("sdf", None, "SDF file with 3D coordinates and explicit hydrogens.")
flags.DEFINE_string("xyz", None, "Multi-molecule XYZ file (Å).")
flags.DEFINE_list("smiles", None, "Comma-separated SMILES (3D conformer: RDKit ETKDG + MMFF).")
flags.DEFINE_string("smiles-file", None, "File with one SMILES per line.")
flags.DEFINE_alias("smiles_file", "smiles-file")
flags.DEFINE_string("qm9-index", None, "QM9 indices (1-based), comma-separated, ranges a-b allowed.")
flags.DEFINE_alias("qm9_index", "qm9-index")
flags.DEFINE_string("out", None, "Output file: .csv or .npz.")
flags.DEFINE_enum("embeddings", "none", ["none", "molecule", "atom"],
                  "Also write the encoder representation: per molecule, or per molecule and per atom (.npz only).")
flags.DEFINE_enum("which", None, ["best", "last"], "Checkpoint (default: best when there is one, else last).")
flags.DEFINE_integer("batch_size", 32, "Molecules per packed batch (the static budget is sized for this many).")
flags.DEFINE_integer("seed", 0, "Seed of the SMILES conformer embedding.")
flags.DEFINE_bool("allow_skips", False, f"Exit 0 instead of {EXIT_PARTIAL} when molecules were skipped.")
flags.mark_flags_as_required(["workdir", "out"])

INPUTS = ("sdf", "xyz", "smiles", "smiles-file", "qm9-index")


@dataclasses.dataclass
class Skipped:
    record: str  # "file:record k (line n)", "--smiles:record k", "qm9 index i"
    reason: str


@dataclasses.dataclass
class Predictions:
    """Per-molecule arrays ``[M]``/``[M, F]`` and per-atom arrays ``[A, ...]`` (molecule ``m``'s
    atoms are rows ``atom_start[m] : atom_start[m] + n_atoms[m]``), in input order."""

    arrays: dict[str, np.ndarray]
    units: dict[str, str]  # property -> unit
    skipped: list[Skipped]
    compilations: int


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def parse_indices(text: str) -> list[int]:
    """``"1,5,10-12"`` -> ``[1, 5, 10, 11, 12]``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"--qm9-index: {part!r} is not an index or a range a-b") from None
    return out


def read_qm9_indices(indices: list[int]):
    """``(molecules, skipped)``: the QM9 molecules qm9pack has, and a skip for each index it lacks."""
    from data_pipelines import qm9pack_source
    from data_pipelines.spectra import inputs

    present = {int(row["Index"]) for row, _ in qm9pack_source.raw_rows()}
    missing = [i for i in indices if i not in present]
    skipped = [Skipped(f"qm9 index {i}", "not in qm9pack (one of QM9's 3,054 uncharacterised "
                       "molecules, or out of range)") for i in missing]
    wanted = [i for i in indices if i in present]
    return (inputs.read_qm9(indices=wanted) if wanted else []), skipped


def read_inputs(source: str, value, seed: int = 0):
    """``(MoleculeInput iterable, skipped)`` for one input flag."""
    from rdkit import RDLogger

    from data_pipelines.spectra import inputs

    # RDKit's own multi-line parse messages would interleave with ours; every failed record is
    # reported once, by record, with RDKit's verdict ("invalid SMILES", "cannot parse").
    RDLogger.DisableLog("rdApp.*")
    if source == "qm9-index":
        return read_qm9_indices(parse_indices(value))
    if source == "sdf":
        return inputs.read_sdf(value), []
    if source == "xyz":
        return inputs.read_xyz(value), []
    if source == "smiles-file":
        return inputs.read_smiles_file(value, seed=seed), []
    return inputs.from_smiles(list(value), seed=seed, where="--smiles"), []


# --------------------------------------------------------------------------------------------------
# Predicting
# --------------------------------------------------------------------------------------------------


def _pack_with_ids(molecules, budget):
    """:func:`graph.pack` plus the host-only ``_id [G]`` (input position of each slot, -1 = none)."""
    from mspec import graph

    batch = graph.pack(molecules, budget)
    batch["_id"] = np.full(budget.n_graph, -1, np.int64)
    batch["_id"][: len(molecules)] = [m["_id"] for m in molecules]
    return batch


def predict(model, molecules, *, embeddings: str = "none", batch_size: int = 32,
            skipped: list[Skipped] | None = None, progress: bool = True) -> Predictions:
    """Runs ``model`` (:class:`mspec.inference.TrainedModel`) on ``MoleculeInput``s.

    Unusable molecules are appended to ``skipped`` (with a line on stderr). The static budget
    is sized from the usable molecules (``batch_size`` per batch, the largest always fits), so
    the model compiles once.
    """
    import tqdm

    from mspec import graph, inference
    from mspec.data import pipeline

    skipped = list(skipped or [])
    kept, feats = [], []
    for mol in tqdm.tqdm(molecules, desc="reading", unit="mol", file=sys.stderr, disable=not progress):
        reason = mol.error or inference.check_molecule(model, mol.numbers, mol.positions, mol.charge)
        if reason is None and model.finetuned:
            try:
                ref = inference.atom_references(model, mol.numbers)
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            skipped.append(Skipped(mol.where, reason))
            tqdm.tqdm.write(f"skipped {mol.where}: {reason}", file=sys.stderr)  # above the bar
            continue
        feat = inference.featurize(model, mol.numbers, mol.positions)
        feat["_id"] = len(kept)
        feat["_ref"] = ref if model.finetuned else 0.0
        kept.append(mol)
        feats.append(feat)
    if not kept:
        raise inference.ModelError(f"no molecule could be predicted ({len(skipped)} skipped)")

    stats = pipeline.molecule_stats(feats)
    budget = graph.budget_from_stats(
        mean_nodes=stats["mean_nodes"], mean_edges=stats["mean_edges"],
        max_nodes=stats["max_nodes"], max_edges=stats["max_edges"], max_torsions=0,
        molecules_per_device=max(1, min(batch_size, len(feats))),
    )
    want = embeddings != "none"
    predictor = inference.Predictor(model, properties=model.finetuned, embeddings=want)
    pred = np.zeros(len(kept))
    n_atoms = np.array([len(m.numbers) for m in kept])
    atom_start = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)
    per_atom = {}
    it = pipeline.PackedBatchIterator(feats, budget, 1, prefetch=2, pack_fn=_pack_with_ids)
    bar = tqdm.tqdm(total=len(kept), desc="predicting", unit="mol", file=sys.stderr, disable=not progress)
    try:
        for global_batch in it:
            batch = {k: v[0] for k, v in global_batch.items()}  # one device batch
            res = predictor(batch)
            node = 0
            for g in np.flatnonzero(batch["graph_mask"]):
                i, n = int(batch["_id"][g]), int(batch["n_node"][g])
                rows = slice(node, node + n)
                node += n
                if model.finetuned:
                    pred[i] = res["pred"][g]
                for key in ("forces", "node_features"):
                    if key in res:
                        if key not in per_atom:
                            per_atom[key] = np.zeros((n_atoms.sum(), *res[key].shape[1:]), np.float32)
                        per_atom[key][atom_start[i] : atom_start[i] + n] = res[key][rows]
            bar.update(int(batch["graph_mask"].sum()))
    finally:
        it.close()
        bar.close()

    arrays = {
        "record": np.array([m.where for m in kept]),
        "name": np.array([m.smiles for m in kept]),
        "n_atoms": n_atoms,
        "atom_start": atom_start,
        "atomic_numbers": np.concatenate([m.numbers for m in kept]).astype(np.int32),
        "positions": np.concatenate([m.positions for m in kept]).astype(np.float64),
    }
    units = {}
    if model.finetuned:
        refs = np.array([f["_ref"] for f in feats])
        y = inference.to_training_units(model, pred, refs)
        name = model.properties[0]
        arrays[name] = y * model.report_factor(name)
        units[name] = model.unit(name)
        if "forces" in per_atom:
            arrays["forces"] = per_atom["forces"].astype(np.float64)  # kcal/mol/Å (factor 1)
            units["forces"] = model.unit("forces")
    if want:
        x = per_atom["node_features"].astype(np.float64)
        arrays["embedding_molecule"] = np.stack(
            [x[s : s + n].mean(axis=0) for s, n in zip(atom_start, n_atoms)])
        if embeddings == "atom":
            arrays["embedding_atom"] = x
    return Predictions(arrays, units, skipped, predictor.traces)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_csv(path: str, p: Predictions) -> None:
    """One row per molecule: record, name, n_atoms, the property (unit in the header), then the
    molecule embedding as ``emb_0 .. emb_{F-1}``."""
    a = p.arrays
    header = ["record", "name", "n_atoms"]
    columns = [a["record"], a["name"], a["n_atoms"]]
    for name, unit in p.units.items():
        if a[name].ndim == 1:  # per-atom forces go to NPZ only
            header.append(f"{name} ({unit})")
            columns.append([repr(float(v)) for v in a[name]])
    if "embedding_molecule" in a:
        e = a["embedding_molecule"]
        header += [f"emb_{k}" for k in range(e.shape[1])]
        columns += [[repr(float(v)) for v in col] for col in e.T]
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(zip(*columns))
    os.replace(path + ".tmp", path)


def write_npz(path: str, p: Predictions, model_description: str) -> None:
    """Every array of :class:`Predictions`, ``unit_<property>`` strings, the model, the skips."""
    extra = {f"unit_{k}": np.array(v) for k, v in p.units.items()}
    extra["model"] = np.array(model_description)
    extra["skipped_record"] = np.array([s.record for s in p.skipped], dtype=str)
    extra["skipped_reason"] = np.array([s.reason for s in p.skipped], dtype=str)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **p.arrays, **extra)
    os.replace(tmp, path)


def summary_line(p: Predictions, out: str) -> str:
    n = len(p.arrays["record"])
    total = n + len(p.skipped)
    line = f"predicted {n} of {total} molecules -> {out}"
    if p.skipped:
        line += f"; skipped {len(p.skipped)} (listed above)"
    return line + f"; {p.compilations} compilation(s)"


def run(workdir: str, source: str, value, out: str, *, embeddings: str = "none",
        which: str | None = None, batch_size: int = 32, seed: int = 0, progress: bool = True
        ) -> Predictions:
    """The command without its flag parsing: reads, predicts, writes ``out``; returns the result."""
    from mspec import inference

    ext = os.path.splitext(out)[1].lower()
    if ext not in (".csv", ".npz"):
        raise inference.ModelError(f"--out {out}: the file must end in .csv or .npz")
    if embeddings == "atom" and ext == ".csv":
        raise inference.ModelError("--embeddings atom needs --out FILE.npz (a CSV holds one row per molecule)")
    config = inference.read_config(workdir)  # refuse before reading any parameters
    if not inference.is_finetuned(config) and embeddings == "none":
        raise inference.ModelError(
            f"{workdir} is not a fine-tuned model (config.task {inference.task_of(config)!r}: a "
            "pre-training run or converted encoder), so it predicts no properties; use "
            "--embeddings molecule (or atom) for its representation")
    if source in ("sdf", "xyz", "smiles-file") and not os.path.isfile(value):
        raise FileNotFoundError(f"--{source} {value}: no such file")
    model = inference.load(workdir, which)
    print(f"model: {model.describe()}", file=sys.stderr, flush=True)
    molecules, skipped = read_inputs(source, value, seed)
    for s in skipped:
        print(f"skipped {s.record}: {s.reason}", file=sys.stderr, flush=True)
    p = predict(model, molecules, embeddings=embeddings, batch_size=batch_size, skipped=skipped,
                progress=progress)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if ext == ".csv":
        write_csv(out, p)
    else:
        write_npz(out, p, model.describe())
    print(summary_line(p, out), file=sys.stderr, flush=True)
    return p


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    given = [name for name in INPUTS if FLAGS[name].value is not None]
    if len(given) != 1:
        print(f"predict: error: give exactly one input of --{', --'.join(INPUTS)}"
              + (f" (got --{', --'.join(given)})" if given else ""), file=sys.stderr)
        sys.exit(2)  # a command-line mistake, as cli.run reports them
    try:
        p = run(FLAGS.workdir, given[0], FLAGS[given[0]].value, FLAGS.out,
                embeddings=FLAGS.embeddings, which=FLAGS.which, batch_size=FLAGS.batch_size,
                seed=FLAGS.seed)
    except (ValueError, OSError) as e:  # the model, an input file or a flag: one line (exit 1)
        raise SystemExit(f"predict: error: {' '.join(str(e).split())}") from None
    if p.skipped and not FLAGS.allow_skips:
        sys.exit(EXIT_PARTIAL)


if __name__ == "__main__":
    from mspec.kernels import host_malloc

    host_malloc.reexec_with_hugepages()  # first: glibc reads its tunables at start-up only
    cli.run(main)
