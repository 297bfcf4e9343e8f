"""benchmarks/stage2_step.py: stage 2 and the denoising step get the same molecules, stage 2 gets
the shipped spectra of those molecules, and the ratio lines pair the runs as documented. No
timing here (the benchmark prints its tables)."""

import numpy as np

from benchmarks import stage2_step
from benchmarks.qm9_molecules import load_batches_npz
from mspec import graph


def test_both_steps_pack_the_same_molecules_and_stage2_their_shipped_spectra(tmp_path):
    path = str(tmp_path / "spectra.npz")
    info = stage2_step.write_batches(4, 2, path)
    assert info["molecules"] == 8
    mols, spectra, qm9_index = stage2_step.load_molecules_with_spectra(8)
    assert len(set(qm9_index)) == 8
    s2, budget2, n2 = stage2_step.host_batches(stage2_step.get_config("stage2", 4), path, True)
    den, budget1, n1 = stage2_step.host_batches(stage2_step.get_config("denoise", 4), path, False)
    assert n1 == n2 == 4 and budget2.spectra == (("uv", 701), ("ir", 3501), ("raman", 3501))
    assert budget1.spectra == () and budget1.n_node == budget2.n_node
    for b, (z, pos, seg) in enumerate(load_batches_npz(path)):
        # The file holds molecules 4b .. 4b+3 of the shipped sticks, with qm9pack geometries.
        np.testing.assert_array_equal(z, np.concatenate([m[0] for m in mols[4 * b: 4 * b + 4]]))
        np.testing.assert_array_equal(pos, np.concatenate([m[1] for m in mols[4 * b: 4 * b + 4]]))
        n = len(z)
        for packed in (s2[b], den[b]):
            p = {k: v[0] for k, v in packed.items()}  # device axis of 1
            np.testing.assert_array_equal(p["atomic_numbers"][:n], z)
            np.testing.assert_array_equal(p["positions"][:n], pos)
            np.testing.assert_array_equal(p["node_graph"][:n], seg)
            assert p["graph_mask"].sum() == 4 and not p["node_mask"][n:].any()
        p = {k: v[0] for k, v in s2[b].items()}
        for t in stage2_step.SPECTRA:
            got = p[graph.spectrum_key(t)]
            np.testing.assert_array_equal(got[:4], np.stack(spectra[t][4 * b: 4 * b + 4]))
            assert not got[4:].any()  # the padding slot
    # The broadened spectra are real ones: non-negative, not all zero.
    assert all(np.stack(spectra[t]).max() > 0 for t in stage2_step.SPECTRA)


def test_ratio_lines_pair_repeats_and_judge_the_target():
    def row(workload, s, repeat):
        return {"workload": workload, "path": "auto (config)", "step_s_median": s, "repeat": repeat}

    rows = [row("stage2", 3.0, 0), row("denoise", 2.0, 0), row("stage2", 2.8, 1),
            row("denoise", 2.0, 1), row("denoise-accum", 1.0, 0)]
    lines = stage2_step.ratio_lines(rows)
    assert lines == [
        "- auto (config): stage 2 2.90 s/step vs denoise 2.00 s/step = 1.45x "
        "(per-repeat 1.50, 1.40); target <= 1.5x met",
        "- auto (config): stage 2 2.90 s/step vs denoise-accum 1.00 s/step = 2.90x (per-repeat 3.00)",
    ]
