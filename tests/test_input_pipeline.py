"""grain reader threads / worker processes in the packed iterator: same molecules, same batches and
same resume position as the inline reader."""

import numpy as np
import pytest

from mspec import graph
from mspec.data import datasets, pipeline


@pytest.fixture(scope="module")
def dataset(qm9_sample_dir):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    return pipeline.make_grain_dataset(source, feat, seed=5, shuffle=True, repeat=True)


BUDGET = graph.Budget(n_node=161, n_edge=3000, n_graph=9, max_torsions=8)


def _take(it, n):
    out = [(next(it), it.state()["next_index"]) for _ in range(n)]
    it.close()
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (x, px), (y, py) in zip(a, b):
        assert px == py
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("start", [0, 37])
def test_threads_match_inline_reader(dataset, start):
    inline = _take(pipeline.PackedBatchIterator(dataset, BUDGET, 2, start=start), 4)
    threaded = _take(pipeline.PackedBatchIterator(dataset, BUDGET, 2, start=start,
                                                  num_threads=3, read_buffer=16), 4)
    _assert_same(inline, threaded)


def test_worker_processes_match_inline_reader(dataset):
    inline = _take(pipeline.PackedBatchIterator(dataset, BUDGET, 2, start=11), 3)
    procs = _take(pipeline.PackedBatchIterator(dataset, BUDGET, 2, start=11, num_workers=2), 3)
    _assert_same(inline, procs)


def test_threads_resume_exactly_and_finite_epoch(dataset, qm9_sample_dir):
    it = pipeline.PackedBatchIterator(dataset, BUDGET, 2, num_threads=2)
    for _ in range(3):
        next(it)
    state = it.state()
    expected = _take(it, 2)
    resumed = _take(pipeline.PackedBatchIterator(dataset, BUDGET, 2, start=state["next_index"],
                                                 num_threads=2), 2)
    _assert_same(expected, resumed)
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    finite = pipeline.make_grain_dataset(datasets.open_split(builder, "validation"),
                                         pipeline.Featurizer(radius=5.5, max_z=100), seed=0,
                                         shuffle=False, repeat=False, limit=60)
    it = pipeline.PackedBatchIterator(finite, BUDGET, 3, num_threads=2)
    assert sum(int(b["graph_mask"].sum()) for b in it) == 60
