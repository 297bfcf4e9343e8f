"""benchmarks/inference.py: the predictor's batches hold exactly the molecules the torchmd-net
reference reads, packed as experiments.predict packs them. No timing here."""

import numpy as np

from benchmarks import inference
from benchmarks.qm9_molecules import load_batches_npz, load_qm9_sample


def test_predictor_batches_hold_the_reference_molecules(tmp_path):
    path = str(tmp_path / "qm9.npz")
    info = inference.write_batches(6, 2, path)
    assert info["molecules"] == 12
    config = inference.get_config("auto")
    assert config.model.message_passing == "auto" and config.model.hidden == 256
    per_batch, budget, pack, prepare = inference.predictor_batches(config, path)
    assert budget.n_graph == 7
    mols = load_qm9_sample(12, seed=0)  # the train_step.py / finetune_step.py selection
    for b, (z, pos, seg) in enumerate(load_batches_npz(path)):
        np.testing.assert_array_equal(z, np.concatenate([m[0] for m in mols[6 * b: 6 * b + 6]]))
        p = pack(per_batch[b])
        again = prepare(b)  # the timed host preparation packs the same batch
        n = len(z)
        for key in ("atomic_numbers", "positions", "node_graph", "senders", "receivers"):
            np.testing.assert_array_equal(again[key], p[key])
        np.testing.assert_array_equal(p["atomic_numbers"][:n], z)
        np.testing.assert_array_equal(p["positions"][:n], pos)
        np.testing.assert_array_equal(p["node_graph"][:n], seg)
        assert p["graph_mask"].sum() == 6 and not p["node_mask"][n:].any()
    with np.load(path) as data:
        assert float(data["target_std"]) > 0  # the standardiser both sides scale by


def test_ratio_lines_compare_best_settings():
    def row(impl, ms, malloc, repeat, path="auto", prep=None):
        r = {"impl": impl, "step_s_median": ms / 1e3, "malloc": malloc, "repeat": repeat,
             "path": path}
        if prep is not None:
            r["host_prep_s_median"] = prep / 1e3
        return r

    ref = "torchmd-net 3.1.0 (2 thr)"
    rows = [row("mspec", 100, "hugetlb", 0, prep=10), row("mspec", 140, "tuned", 0, prep=10),
            row(ref, 300, "hugetlb", 0, "upstream ET"), row(ref, 250, "tuned", 0, "upstream ET")]
    assert inference.ratio_lines(rows) == [
        "- inference, mspec auto: mspec 100.0 ms/batch (hugetlb) vs torchmd-net 250.0 ms/batch "
        "(tuned) = 2.50x (per-repeat 2.50); target >= 2x met",
        "- inference + host featurisation and packing, mspec auto: 110.0 ms/batch = 2.27x",
    ]
