"""The shipped QM9 stick spectra and their growing extension (data_pipelines/spectra/data/):
both are readable, disjoint, and together with their failures they are exactly a prefix of the
documented sample order, so the computation can resume where they stop."""

from __future__ import annotations

import json
import os

from data_pipelines.spectra import inputs, sticks

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "data_pipelines", "spectra", "data")


def _indices(name: str) -> tuple[list[int], list[int]]:
    """(QM9 indices of the computed molecules, of the failures) of one shipped directory."""
    done = [int(r.qm9_index) for r in sticks.read(os.path.join(DATA, name, "sticks.jsonl.gz"))]
    with open(os.path.join(DATA, name, "failures.jsonl")) as f:
        failed = [int(json.loads(line)["index"]) for line in f if line.strip()]
    return done, failed


def test_shipped_set_and_extension_are_a_prefix_of_the_sample_order():
    shipped_done, shipped_failed = _indices("qm9_gfn2")
    ext_done, ext_failed = _indices("qm9_gfn2_extension")
    shipped = set(shipped_done) | set(shipped_failed)
    extension = set(ext_done) | set(ext_failed)
    assert not shipped & extension
    assert len(shipped) == len(shipped_done) + len(shipped_failed)
    assert len(extension) == len(ext_done) + len(ext_failed)
    with open(os.path.join(DATA, "qm9_gfn2", "meta.json")) as f:
        shipped_meta = json.load(f)
    with open(os.path.join(DATA, "qm9_gfn2_extension", "meta.json")) as f:
        assert json.load(f) == shipped_meta  # same command and settings
    # python -m data_pipelines.spectra.run compute --qm9-sample 6000 --seed 0, computed in order.
    k = len(shipped) + len(extension)
    order = [m.index for m in inputs.read_qm9(positions=inputs.qm9_sample_positions(6000, 0)[:k])]
    assert set(order[: len(shipped)]) == shipped
    assert set(order[len(shipped):]) == extension
