"""The benchmark's ratio summary pairs runs correctly (benchmarks/train_step.py)."""

from benchmarks.train_step import ratio_summary


def _row(impl, rate, malloc="hugetlb", repeat=0, config=None, precision=None):
    r = {"impl": impl, "mol_per_s_median": rate, "malloc": malloc, "repeat": repeat}
    if config:
        r["config"] = config
    if precision:
        r["precision"] = precision
    return r


def test_ratios_pair_same_setting_and_repeat_and_keep_bf16_reference_apart():
    rows = [
        _row("mspec", 40.0, config="qm9", repeat=0),
        _row("torchmd-net (2 thr)", 20.0, repeat=0, precision="float32"),
        _row("torchmd-net (2 thr, bf16 autocast)", 50.0, repeat=0, precision="bfloat16"),
        _row("mspec", 30.0, config="qm9", repeat=1),
        _row("torchmd-net (2 thr)", 30.0, repeat=1, precision="float32"),
        _row("torchmd-net (2 thr, bf16 autocast)", 60.0, repeat=1, precision="bfloat16"),
    ]
    lines = ratio_summary(rows, ["hugetlb"])
    fp32 = [l for l in lines if "bf16" not in l]
    bf16 = [l for l in lines if "bf16 autocast" in l]
    # Per-repeat ratios 2.0 and 1.0, median 1.5; the bf16 reference never enters these.
    assert any("hugetlb malloc: mspec / torchmd-net = 1.50x (per-repeat 2.00, 1.00)" in l for l in fp32)
    # Best vs best: mspec median(40, 30) = 35 against the float32 reference's median 25.
    assert any("mspec 35.0 mol/s" in l and "25.0 mol/s" in l and "1.40x" in l for l in fp32)
    # The bf16 reference gets its own lines: ratios 0.80 and 0.50.
    assert any("(bf16 autocast) = 0.65x (per-repeat 0.80, 0.50)" in l for l in bf16)


def test_no_reference_rows_gives_no_ratio_lines():
    assert ratio_summary([_row("mspec", 40.0, config="qm9")], ["hugetlb"]) == []


def test_microbatched_runs_get_their_own_lines():
    rows = [
        _row("mspec", 40.0, config="qm9"),
        _row("mspec", 50.0, config="qm9, microbatches=4"),
        _row("mspec", 99.0, config="tiny"),  # not QM9-size: never compared
        _row("torchmd-net (2 thr)", 25.0, precision="float32"),
    ]
    lines = ratio_summary(rows, ["hugetlb"])
    assert any(l.startswith("- qm9, hugetlb malloc") and "1.60x" in l for l in lines)
    assert any(l.startswith("- qm9, microbatches=4, hugetlb malloc") and "2.00x" in l for l in lines)
    assert not any("tiny" in l for l in lines)
