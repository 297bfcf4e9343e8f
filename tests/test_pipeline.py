"""The input pipeline: featurising, bad records, packing, exact iterator resume, finite epochs."""

import numpy as np
import pytest

from mspec import graph
from mspec.data import datasets, pipeline


def _example(z, n=None, index=7):
    z = np.asarray(z, np.int32)
    rng = np.random.default_rng(0)
    return {
        "index": index,
        "atomic_numbers": z,
        "positions": rng.normal(size=(len(z) if n is None else n, 3)).astype(np.float32),
        "torsions": np.zeros((0, 4), np.int32),
        "torsion_moving": np.zeros((0,), bool),
    }


def test_element_outside_embedding_is_a_clear_error():
    f = pipeline.Featurizer(radius=5.5, max_z=10, dataset="qm9/sample")
    f(_example([6, 1, 1]))
    with pytest.raises(pipeline.BadRecordError, match="record 7: element Z=17 .*max_z=10"):
        f(_example([6, 17, 1]))
    with pytest.raises(pipeline.BadRecordError, match="disagree"):
        f(_example([6, 1], n=3))


@pytest.fixture(scope="module")
def train_dataset(qm9_sample_dir):
    builder = datasets.get_builder("qm9/sample", qm9_sample_dir, build=False)
    source = datasets.open_split(builder, "train")
    feat = pipeline.Featurizer(radius=5.5, max_z=100)
    return source, feat


def _budget():
    return graph.Budget(n_node=161, n_edge=3000, n_graph=9, max_torsions=8)


def test_batches_have_static_shapes_and_fill(train_dataset):
    source, feat = train_dataset
    ds = pipeline.make_grain_dataset(source, feat, seed=0, shuffle=True, repeat=True)
    it = pipeline.PackedBatchIterator(ds, _budget(), num_devices=2)
    shapes = None
    for _ in range(5):
        b = next(it)
        s = {k: v.shape for k, v in b.items()}
        assert shapes in (None, s)
        shapes = s
        assert b["positions"].shape == (2, 161, 3)
        assert not b["node_mask"][:, -1].any() and not b["graph_mask"][:, -1].any()
        assert pipeline.fill(b)["node_fill"] > 0.6
    it.close()


def test_iterator_resumes_exactly(train_dataset):
    source, feat = train_dataset
    ds = pipeline.make_grain_dataset(source, feat, seed=3, shuffle=True, repeat=True)
    it = pipeline.PackedBatchIterator(ds, _budget(), num_devices=2)
    for _ in range(3):
        next(it)
    state = it.state()
    expected = [next(it) for _ in range(3)]
    it.close()
    resumed = pipeline.PackedBatchIterator(ds, _budget(), num_devices=2, start=state["next_index"])
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    resumed.close()


def test_finite_iteration_sees_each_molecule_once(train_dataset):
    source, feat = train_dataset
    ds = pipeline.make_grain_dataset(source, feat, seed=0, shuffle=False, repeat=False, limit=100)
    it = pipeline.PackedBatchIterator(ds, _budget(), num_devices=3)
    total = sum(int(b["graph_mask"].sum()) for b in it)
    assert total == 100


def test_per_host_shards_partition_the_data(train_dataset):
    source, feat = train_dataset
    parts = [
        pipeline.make_grain_dataset(
            source, feat, seed=0, shuffle=False, repeat=False, limit=50, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    assert len(parts[0]) + len(parts[1]) == 50
