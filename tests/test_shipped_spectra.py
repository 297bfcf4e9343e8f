"""The shipped QM9 stick spectra (data_pipelines/spectra/data/qm9_gfn2): readable, exactly a prefix
of the documented sample order together with their failures (so the computation can resume where
they stop), at least 5,000 molecules of QM9's training split, and the dataset's version 1.0.0
(its first 1,119 records) is the set shipped before it grew."""

from __future__ import annotations

import json
import os

from data_pipelines import qm9pack_source, qm9s
from data_pipelines.spectra import inputs, sticks

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "data_pipelines", "spectra", "data", "qm9_gfn2")
# The first 1,128 sample positions: the set shipped until December 2026 (qm9s gfn2 1.0.0).
V1_POSITIONS = 1128


def _shipped() -> tuple[list[int], list[int]]:
    """(QM9 indices of the computed molecules in file order, of the failures)."""
    done = [int(r.qm9_index) for r in sticks.read(os.path.join(SHIPPED, "sticks.jsonl.gz"))]
    with open(os.path.join(SHIPPED, "failures.jsonl")) as f:
        failed = [int(json.loads(line)["index"]) for line in f if line.strip()]
    return done, failed


def test_shipped_set_is_a_prefix_of_the_sample_order_and_version_1_its_first_records():
    done, failed = _shipped()
    assert len(set(done)) == len(done) and not set(done) & set(failed)
    # python -m data_pipelines.spectra.run compute --qm9-sample N --seed 0, computed in order.
    k = len(done) + len(failed)
    positions = inputs.qm9_sample_positions(k, 0)
    order = [m.index for m in inputs.read_qm9(positions=positions)]
    assert set(order) == set(done) | set(failed)
    v1 = qm9s.GFN2_MOLECULES["1.0.0"]
    v1_failed = [i for i in failed if i in set(order[:V1_POSITIONS])]
    assert set(done[:v1]) | set(v1_failed) == set(order[:V1_POSITIONS])
    # Issue #17: at least 5,000 QM9 training-split molecules (qm9s/gfn2_qm9train:2.0.0).
    train = set(qm9pack_source.split_indices()[0].tolist())
    in_train = {i for p, i in zip(positions, order) if int(p) in train}
    assert len(in_train & set(done)) >= 5000
