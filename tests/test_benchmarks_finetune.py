"""benchmarks/finetune_step.py: both implementations get the same molecules and labels, and the
ratio lines pair the runs as documented. No timing here (the benchmark prints its tables)."""

import numpy as np

from benchmarks import finetune_step
from benchmarks.qm9_molecules import load_batches_npz


def test_mspec_batches_hold_the_reference_molecules_labels_and_forces(tmp_path):
    path = str(tmp_path / "md17.npz")
    info = finetune_step.write_batches("md17-b8", 2, path)
    assert info["molecules"] == 16
    config = finetune_step.get_config("md17-b8")
    packed, budget = finetune_step.mspec_batches(config, path)
    with np.load(path) as data:
        mean, std = float(data["target_mean"]), float(data["target_std"])
        ys = [data[f"y_{b}"] for b in range(2)]
        forces = [data[f"forces_{b}"] for b in range(2)]
    assert std > 0
    # What torchmd_finetune_reference.py reads, batch by batch, against mspec's packed batch.
    for b, (z, pos, seg) in enumerate(load_batches_npz(path)):
        p = {k: v[0] for k, v in packed[b].items()}  # device axis of 1
        n = len(z)
        assert p["node_mask"].sum() == n and p["graph_mask"].sum() == 8
        np.testing.assert_array_equal(p["atomic_numbers"][:n], z)
        np.testing.assert_array_equal(p["positions"][:n], pos)
        np.testing.assert_array_equal(p["node_graph"][:n], seg)
        np.testing.assert_allclose(p["target"][:8], (ys[b] - mean).astype(np.float32), rtol=0, atol=1e-3)
        np.testing.assert_array_equal(p["forces"][:n], forces[b])
        assert not p["node_mask"][n:].any()
    # The first frames of the shipped trajectory's train_950 split, in that order.
    from data_pipelines import md17

    traj = md17.read_md17(f"{md17.GFN2_DIR}/md17_aspirin.npz")
    frames = md17.random_splits(len(traj.E))["train_950"][:16]
    np.testing.assert_allclose(ys[0], traj.E[frames[:8]])
    assert budget.n_graph == 9


def _row(impl, ms, malloc="hugetlb", repeat=0, path="xla (config)", workload="qm9", error=None):
    r = {"impl": impl, "step_s_median": ms / 1e3, "malloc": malloc, "repeat": repeat,
         "path": path, "workload": workload}
    if error:
        r["error"] = error
    return r


def test_ratio_lines_compare_best_settings_and_report_failures():
    rows = [
        _row("mspec", 100, "hugetlb", 0), _row("mspec", 150, "tuned", 0),
        _row("torchmd-net 3.1.0 (2 thr)", 400, "hugetlb", 0, "upstream ET"),
        _row("torchmd-net 3.1.0 (2 thr)", 250, "tuned", 0, "upstream ET"),
        _row("mspec", 120, "hugetlb", 1), _row("mspec", 150, "tuned", 1),
        _row("torchmd-net 3.1.0 (2 thr)", 400, "hugetlb", 1, "upstream ET"),
        _row("torchmd-net 3.1.0 (2 thr)", 200, "tuned", 1, "upstream ET"),
        _row("mspec", 0, path="auto", workload="md17-b8", error="ValueError: no second order"),
        _row("torchmd-net 3.1.0 (2 thr)", 50, "tuned", 0, "upstream ET", "md17-b8"),
    ]
    lines = finetune_step.ratio_lines(rows)
    # mspec best: hugetlb, median(100, 120) = 110 ms; reference best: tuned, median(250, 200) = 225.
    qm9 = [line for line in lines if line.startswith("- qm9")]
    assert qm9 == ["- qm9, mspec xla (config): mspec 110.0 ms/step (hugetlb) vs torchmd-net 225.0 "
                   "ms/step (tuned) = 2.05x (per-repeat 2.50, 1.67); target >= 2x met"]
    assert any("md17-b8, mspec auto: failed (ValueError: no second order)" in line for line in lines)


def test_qm9_batches_carry_the_homo_labels_of_the_train_step_molecules(tmp_path):
    from benchmarks.qm9_molecules import load_qm9_sample

    path = str(tmp_path / "qm9.npz")
    finetune_step.write_batches("qm9", 1, path)
    packed, _ = finetune_step.mspec_batches(finetune_step.get_config("qm9"), path)
    p = {k: v[0] for k, v in packed[0].items()}
    mols = load_qm9_sample(128, seed=0)  # the molecules train_step.py times
    z, pos, _ = load_batches_npz(path)[0]
    np.testing.assert_array_equal(z, np.concatenate([m[0] for m in mols]))
    np.testing.assert_array_equal(p["positions"][: len(z)], pos)
    with np.load(path) as data:
        y, mean = data["y_0"], float(data["target_mean"])
    # HOMO energies in eV (QM9: about -11 to -4 eV), as residuals from the standardiser's mean.
    assert -12 < y.min() and y.max() < -3
    np.testing.assert_allclose(p["target"][:128], y - mean, atol=1e-5)
