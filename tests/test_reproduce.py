"""The reproduction study's harness (experiments.reproduce) at its smoke scale.

These tests check the harness (stages, skip and resume, failure reporting, files and tables), not
the science: the smoke scale trains for a handful of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from experiments import reproduce, reproduce_report, reproduce_runner, reproduce_stages
from experiments.configs import reproduce as study_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# One device per stage, as a user's run (no inherited XLA_FLAGS), with the stages' programs
# compiled at LLVM optimisation level 0: compiling is most of a smoke stage's time, and this
# halves it (a smoke study: ~88 s instead of ~110 s); these tests check the harness, not the
# numbers, and every run they compare is compiled the same way.
STAGE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _run(args, data_dir, timeout=1800):
    env = dict(os.environ, MSPEC_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
               XLA_FLAGS=STAGE_XLA_FLAGS)
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_study(qm9_sample_dir, tmp_path_factory):
    # Two workers: independent stages run at once, and the two stage-2 arms (then the MD17
    # arms) build their dataset in the same data directory at the same time.
    workdir = str(tmp_path_factory.mktemp("study"))
    proc = _run(["--scale", "smoke", "--workdir", workdir, "--jobs", "2"], qm9_sample_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc


@pytest.mark.parametrize("platforms,jobs,message", [
    ("cuda", "2", "stages cannot share them; use --jobs 1"),
    ("cpu", "0", "--jobs 0: must be at least 1"),
])
def test_jobs_is_refused_where_stages_would_share_devices(platforms, jobs, message, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    with pytest.raises(SystemExit, match=message):
        reproduce.main(["--scale", "smoke", "--workdir", str(tmp_path / "w"), "--jobs", jobs])
    assert not os.path.exists(tmp_path / "w")


def test_plan_covers_every_arm_target_and_seed():
    p = reproduce.load_protocol("cpu", [])
    stages = reproduce_stages.plan(p)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    assert names[:4] == ["pretrain/coord", "pretrain/frad", "pretrain/molspectra",
                         "pretrain/coord_control"]
    fine = [s for s in stages if s.kind == "finetune"]
    assert len(fine) == len(p.arms) * len(p.seeds) * (len(p.qm9.targets) + 1)
    # Dependencies always run earlier; scratch needs nothing.
    position = {n: i for i, n in enumerate(names)}
    for s in stages:
        assert all(position[n] < position[s.name] for n in s.needs)
        assert (s.needs == ()) == (s.arm == "scratch" or s.name in ("pretrain/coord", "pretrain/frad"))
    # Same fine-tuning recipe for every arm: the overrides differ only in seed and init.
    by_target = {}
    for s in fine:
        recipe = {k: v for k, v in s.overrides if k not in ("seed", "init.checkpoint")}
        by_target.setdefault(s.target, []).append(recipe)
    for recipes in by_target.values():
        assert all(r == recipes[0] for r in recipes)
    # The control differs from MolSpectra only by the two spectral weights.
    ms = dict(stages[2].overrides)
    ctl = dict(stages[3].overrides)
    assert {k for k in ms.keys() | ctl.keys() if ms.get(k) != ctl.get(k)} == {
        "loss.mpr_weight", "loss.contrastive_weight"}
    assert ctl["loss.mpr_weight"] == 0.0 and ctl["loss.contrastive_weight"] == 0.0
    assert ms["init_from.checkpoint"] == "pretrain/coord"
    # Stage 2 reads QM9 training-split molecules only; QM9 labels are a training-split prefix.
    assert ms["data.dataset"] == "qm9s/gfn2_qm9train:2.0.0"
    qm9 = dict(next(s for s in fine if s.target == "homo").overrides)
    assert qm9["data.train_split"] == f"train[:{p.qm9.num_labels}]"
    assert qm9["evaluate.checkpoints"] == ("best",)


@pytest.mark.parametrize("scale", study_config.SCALES)
def test_dry_run_prints_every_stage_command_and_cost(scale, tmp_path, capsys):
    assert reproduce.main(["--scale", scale, "--workdir", str(tmp_path / "w"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = reproduce_stages.plan(reproduce.load_protocol(scale, []))
    for s in stages:
        assert f"] {s.name}: {s.steps:,} steps, est." in out
    assert out.count(" -m experiments.") == len(stages)
    assert f"{len(stages)} stages; estimated" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_protocol_overrides_are_checked():
    p = reproduce.load_protocol("cpu", ["qm9.num_labels=2000", "seeds=[4,5,6]"])
    assert p.qm9.num_labels == 2000 and p.seeds == (4, 5, 6)
    with pytest.raises(SystemExit, match="no protocol key 'qm9.num_label'"):
        reproduce.load_protocol("cpu", ["qm9.num_label=2000"])


def test_changed_protocol_is_refused(tmp_path):
    reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu", []))
    reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu", ["cost.qm9_step_s=9"]))
    with pytest.raises(SystemExit, match=r"another protocol \(qm9.num_labels: 1000 -> 50\)"):
        reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu", ["qm9.num_labels=50"]))


def test_protocol_keys_added_later_default_to_the_recorded_study(tmp_path):
    # The committed CPU study was recorded before qm9.extra / md17.extra existed: it must still
    # continue under today's protocol, and a non-empty extra is a different study.
    current = reproduce.load_protocol("cpu_v1", [])
    saved = reproduce.protocol_json(current)
    del saved["qm9"]["extra"], saved["md17"]["extra"]
    (tmp_path / reproduce.PROTOCOL_FILE).write_text(json.dumps(saved))
    reproduce.check_protocol(str(tmp_path), current)
    with pytest.raises(SystemExit, match=r"qm9.extra: None -> \['init.zero_scalar_readout=True'\]"):
        reproduce.check_protocol(str(tmp_path), reproduce.load_protocol(
            "cpu_v1", ["qm9.extra=('init.zero_scalar_readout=True',)"]))


def test_protocol_v2_changes_only_readout_learning_rates_and_spectra_set():
    """``cpu_v2`` is v1 (``cpu_v1``) with the follow-ups' validated changes, nothing else."""
    v1 = reproduce.protocol_json(reproduce.load_protocol("cpu_v1", []))
    v2 = reproduce.protocol_json(reproduce.load_protocol("cpu_v2", []))
    assert sorted(reproduce._diff(v1, v2)) == [
        "md17.extra: [] -> ['init.zero_scalar_readout=True']",
        "md17.lr: 0.0005 -> 0.004",
        "protocol_version: '' -> '2'",
        "qm9.extra: [] -> ['init.zero_scalar_readout=True']",
        "qm9.lr: 0.001 -> 0.002",
        "stage2.dataset: 'qm9s/gfn2_qm9train:1.0.0' -> 'qm9s/gfn2_qm9train:2.0.0'",
    ]
    assert v1["scale"] == v2["scale"] == "cpu"


def test_protocol_v3_pretrains_four_times_longer_than_v2():
    """``--scale cpu`` (v3) is v2 with 4,000 stage-1 steps (follow-up 9), nothing else."""
    v2 = reproduce.protocol_json(reproduce.load_protocol("cpu_v2", []))
    v3 = reproduce.protocol_json(reproduce.load_protocol("cpu", []))
    assert sorted(reproduce._diff(v2, v3)) == [
        "pretrain.steps: 1000 -> 4000", "protocol_version: '2' -> '3'"]
    assert v3["scale"] == "cpu"


def test_the_committed_study_continues_as_protocol_v1(tmp_path):
    """docs/reproduction/state was recorded before dataset versions and protocol versions: it is
    ``--scale cpu_v1`` (its unversioned spectra set was then version 1.0.0), and ``--scale cpu``
    refuses it with the differences and the scale it belongs to."""
    state = os.path.join(REPO, "docs", "reproduction", "state")
    with open(os.path.join(state, reproduce.PROTOCOL_FILE)) as f:
        recorded = json.load(f)
    assert recorded["stage2"]["dataset"] == "qm9s/gfn2_qm9train"
    assert "protocol_version" not in recorded
    (tmp_path / reproduce.PROTOCOL_FILE).write_text(json.dumps(recorded))
    reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu_v1", []))
    with pytest.raises(SystemExit, match=r"qm9.lr: 0.001 -> 0.002.*\(it is the study of "
                                         r"--scale cpu_v1\); use a new --workdir"):
        reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu", []))
    # Recorded after versions existed, an unversioned name means the current default version.
    current = reproduce.protocol_json(reproduce.load_protocol("cpu_v1", []))
    current["stage2"]["dataset"] = "qm9s/gfn2_qm9train"
    (tmp_path / reproduce.PROTOCOL_FILE).write_text(json.dumps(current))
    with pytest.raises(SystemExit, match=r"stage2.dataset: 'qm9s/gfn2_qm9train' -> "
                                         r"'qm9s/gfn2_qm9train:1.0.0'\)(?! \(it is)"):
        reproduce.check_protocol(str(tmp_path), reproduce.load_protocol("cpu_v1", []))


def test_protocol_extra_reaches_every_finetuning_stage_of_its_block():
    p = reproduce.load_protocol("smoke", ["qm9.extra=('init.zero_scalar_readout=True',)"])
    stages = reproduce_stages.finetune_stages(p)
    qm9 = [s for s in stages if s.target in p.qm9.targets]
    md17 = [s for s in stages if s.target == p.md17.molecule]
    assert qm9 and md17
    assert all(("init.zero_scalar_readout", "True") in s.overrides for s in qm9)
    assert not any(k == "init.zero_scalar_readout" for s in md17 for k, _ in s.overrides)
    p = reproduce.load_protocol("smoke", ["qm9.extra=('no_equals_sign',)"])
    with pytest.raises(ValueError, match="expected 'KEY=VALUE'"):
        reproduce_stages.finetune_stages(p)


def test_goal_checks():
    rows = {"scratch": dict(mean=20.0, min=19.0, max=21.0),
            "coord": dict(mean=17.0, min=16.5, max=17.5, change_vs_scratch=-0.15,
                          published_change_vs_scratch=-0.128),
            "frad": dict(mean=16.0, min=15.0, max=16.4, change_vs_scratch=-0.20,
                         published_change_vs_scratch=-0.246)}
    checks = reproduce_report.goal_checks(rows)
    assert checks["order scratch > Coord > Frad (means)"] is True
    assert checks["seed ranges do not overlap (Frad < Coord < scratch)"] is True
    assert checks["Coord gain >= half the published gain"] is True
    assert checks["Frad gain >= half the published gain"] is True
    assert checks["MolSpectra <= its denoising-only control (means)"] is None
    rows["frad"]["max"] = 16.6 + 1.0
    assert reproduce_report.goal_checks(rows)["seed ranges do not overlap (Frad < Coord < scratch)"] is False


def test_paired_changes_compare_arms_at_the_same_seed():
    def run(arm, seed, mae):
        return {"arm": arm, "target": "homo", "seed": seed, "test_mae": mae}
    # Seed 2 is hard for every arm; Coord is 10 % better than scratch at each seed, which the
    # spread of the means (overlapping ranges) hides and the per-seed comparison shows.
    runs = [run("scratch", 1, 100.0), run("scratch", 2, 200.0), run("coord", 1, 90.0),
            run("coord", 2, 180.0), run("frad", 1, 110.0), run("frad", 3, 50.0),
            run("molspectra", 1, 95.0), run("coord_control", 1, 100.0),
            {"arm": "coord", "target": "lumo", "seed": 3, "test_mae": 1.0}]
    paired = reproduce_report.paired_changes(runs, "homo", study_config.ARMS)
    assert paired["coord"]["seeds"] == [1, 2]
    assert paired["coord"]["changes"] == pytest.approx([-0.1, -0.1])
    assert paired["coord"]["better"] == 2
    assert paired["frad"]["seeds"] == [1]  # seed 3 has no scratch run to pair with
    assert paired["frad"]["changes"] == pytest.approx([0.1]) and paired["frad"]["better"] == 0
    assert paired["molspectra"]["reference"] == "coord_control"
    assert paired["molspectra"]["changes"] == pytest.approx([-0.05])
    assert paired["coord_control"]["changes"] == pytest.approx([0.0])
    assert "scratch" not in paired
    rows = reproduce_report.paired_table({"paired": paired})
    assert any("| Coord | scratch | -10.0 % (seed 1), -10.0 % (seed 2) | -10.0 % | 2 of 2 seeds |"
               == r for r in rows)


def test_smoke_study_writes_results_report_and_figures(smoke_study):
    workdir, proc = smoke_study
    p = reproduce.load_protocol("smoke", [])
    stages = reproduce_stages.plan(p)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["complete"] is True
    assert set(results["stages"]) == {s.name for s in stages}
    assert all(r["status"] == "done" and r["wall_s"] > 0 for r in results["stages"].values())
    runs = results["runs"]
    assert len(runs) == sum(s.kind == "finetune" for s in stages)
    targets = list(p.qm9.targets) + [p.md17.molecule]
    for target in targets:
        summary = results["summary"][target]
        assert set(summary["arms"]) == set(p.arms)
        for arm, row in summary["arms"].items():
            vals = [r["test_mae"] for r in runs if r["arm"] == arm and r["target"] == target]
            assert row["n"] == len(p.seeds) == len(vals)
            assert row["mean"] == pytest.approx(sum(vals) / len(vals))
            assert row["std"] == 0.0 if row["n"] == 1 else row["std"] > 0
    for r in runs:
        assert r["test_mae"] > 0 and r["validation_curve"] and r["best_step"] > 0
        # The reported test MAE is the best-validation checkpoint's, as in its results.json.
        with open(os.path.join(workdir, "finetune", r["target"], r["arm"], f"seed{r['seed']}",
                               "results.json")) as f:
            own = json.load(f)
        key = "mae" if r["target"] in p.qm9.targets else "forces_mae"
        assert own["best"]["test"][key] == r["test_mae"] and "last" not in own
        assert own["split_sizes"]["test"] == r["test_size"]
    qm9_run = next(r for r in runs if r["target"] == "homo")
    assert qm9_run["train_size"] == p.qm9.num_labels
    report = open(os.path.join(workdir, "report.md")).read()
    assert "Stages done: " in report and "(complete)" in report
    for target in targets:
        assert f"### {target} (" in report
        with open(os.path.join(workdir, f"validation_{target}.png"), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    for name in ("test_mae.png", "pretraining_loss.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert "Coord + denoising only (control)" in report and "published" in report
    assert "## Protocol (fixed before the results were seen)" in report


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(smoke_study, qm9_sample_dir):
    workdir, _ = smoke_study
    stage = os.path.join(workdir, "finetune", "homo", "frad", "seed1")
    with open(os.path.join(stage, "results.json")) as f:
        before = json.load(f)["best"]["test"]["mae"]
    # As if the stage was killed after its last checkpoint, before it evaluated.
    os.remove(os.path.join(stage, "results.json"))
    status = reproduce_stages.read_status(stage)
    status["status"] = "interrupted"
    reproduce_stages.write_status(stage, status)
    proc = _run(["--scale", "smoke", "--workdir", workdir], qm9_sample_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [ln for ln in proc.stdout.splitlines() if "resuming" in ln or "starting" in ln]
    assert len(ran) == 1 and "finetune/homo/frad/seed1" in ran[0], proc.stdout
    assert proc.stdout.count("skipped") == len(reproduce_stages.plan(reproduce.load_protocol("smoke", []))) - 1
    assert "resumed from step" in open(os.path.join(stage, "log.txt")).read()
    with open(os.path.join(stage, "results.json")) as f:
        assert json.load(f)["best"]["test"]["mae"] == before  # the same checkpoint, exactly
    assert len(reproduce_stages.read_status(stage)["attempts"]) == 2


def test_failed_stage_is_reported_and_dependents_do_not_run(smoke_study, qm9_sample_dir, tmp_path):
    workdir = str(tmp_path / "study")
    # --isolate: every stage as its own entry-point process.
    proc = _run(["--scale", "smoke", "--workdir", workdir, "--isolate",
                 "--only", "pretrain/coord,finetune/homo/coord/seed1,finetune/homo/scratch/seed1",
                 "--set", "pretrain.dataset=qm9/no_such_config"], qm9_sample_dir)
    assert proc.returncode == 1
    assert "pretrain/coord: FAILED" in proc.stderr
    assert "finetune/homo/coord/seed1: not run, needs pretrain/coord (failed)" in proc.stdout
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["stages"]["pretrain/coord"]["status"] == "failed"
    assert results["stages"]["pretrain/coord"]["log"] == os.path.join("pretrain", "coord", "log.txt")
    assert results["stages"]["finetune/homo/scratch/seed1"]["status"] == "done"  # the others go on
    report = open(os.path.join(workdir, "report.md")).read()
    assert "**Failed stages**" in report and "pretrain/coord/log.txt" in report
    # The entry-point process computes exactly what a study worker computed for the same stage.
    scratch = os.path.join("finetune", "homo", "scratch", "seed1", "results.json")
    with open(os.path.join(workdir, scratch)) as f, open(os.path.join(smoke_study[0], scratch)) as g:
        assert json.load(f)["best"] == json.load(g)["best"]
    status = reproduce_stages.read_status(os.path.join(workdir, "finetune", "homo", "scratch", "seed1"))
    assert status["attempts"][-1]["process"] == "own process"


def _runner_env(monkeypatch, data_dir):
    monkeypatch.setenv("MSPEC_DATA_DIR", data_dir)
    monkeypatch.setenv("XLA_FLAGS", STAGE_XLA_FLAGS)


def test_a_crashed_worker_fails_its_stage_only_and_is_replaced(qm9_sample_dir, tmp_path, monkeypatch):
    _runner_env(monkeypatch, qm9_sample_dir)
    crash = tmp_path / "crash.py"
    crash.write_text("import os, signal\n\ndef get_config():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise ValueError('planted config mistake')\n")
    stages = [reproduce_stages.Stage(name=f"pretrain/{n}", module="experiments.pretrain",
                                     config=str(path), overrides=(), needs=(), steps=1,
                                     estimate_s=1.0, arm=n)
              for n, path in (("crash", crash), ("broken", broken))]
    workdir = str(tmp_path / "study")
    runner = reproduce_runner.StageRunner(workdir, jobs=1)
    try:
        results = []
        for st in stages:
            runner.start(st)
            results.append(runner.wait_one().status)
    finally:
        runner.close()
    assert [r["status"] for r in results] == ["failed", "failed"]
    assert "exit status -9" in results[0]["error"]
    assert "worker process running this stage died (exit code -9)" in results[0]["error"]
    # The next stage ran in a new worker and failed on its own, with its error in one line.
    assert "experiments.pretrain: error:" in results[1]["error"]
    assert "planted config mistake" in results[1]["error"]


def test_a_signal_stops_running_stages_at_a_checkpoint(qm9_sample_dir, tmp_path, monkeypatch):
    _runner_env(monkeypatch, qm9_sample_dir)
    p = reproduce.load_protocol("smoke", ["qm9.steps=100000", "qm9.eval_every=100000"])
    st = next(s for s in reproduce_stages.plan(p) if s.name == "finetune/homo/scratch/seed1")
    workdir = str(tmp_path / "study")
    log = os.path.join(st.workdir(workdir), "log.txt")
    runner = reproduce_runner.StageRunner(workdir, jobs=1)
    try:
        runner.start(st)
        deadline = time.time() + 300
        while time.time() < deadline and not (os.path.isfile(log) and "step 6/" in open(log).read()):
            time.sleep(0.2)
        assert runner.interrupt() == [st.name]
    finally:
        runner.close()
    status = reproduce_stages.read_status(st.workdir(workdir))
    assert status["status"] == "interrupted" and status["attempts"][-1]["rc"] == "interrupted"
    saved = reproduce_stages.checkpoint_steps(os.path.join(st.workdir(workdir), "checkpoints"))
    assert saved and saved[-1] >= 6
    assert f"stopped by SIGTERM at step {saved[-1]}" in open(log).read()


def test_exported_state_continues_as_a_finished_study(smoke_study, qm9_sample_dir, tmp_path, capsys):
    workdir, _ = smoke_study
    dest = str(tmp_path / "state")
    assert reproduce.main(["--scale", "smoke", "--workdir", workdir, "--report-only",
                           "--export", str(tmp_path / "docs"), "--export-state", dest]) == 0
    # The closing line names the command that continues it, scale included.
    assert (f"`cp -r {dest} DIR` and `python -m experiments.reproduce --scale smoke --workdir DIR`"
            in capsys.readouterr().out)
    for name in ("results.json", "report.md", "protocol.json", "test_mae.png"):
        assert os.path.isfile(tmp_path / "docs" / name)
    # Only the last pre-training checkpoint travels; fine-tuning stages keep their records.
    assert reproduce_stages.checkpoint_steps(os.path.join(dest, "pretrain", "coord", "checkpoints")) == [6]
    assert not os.path.exists(os.path.join(dest, "finetune", "homo", "coord", "seed1", "checkpoints"))
    proc = _run(["--scale", "smoke", "--workdir", dest], qm9_sample_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(reproduce_stages.plan(reproduce.load_protocol("smoke", [])))
    assert proc.stdout.count("skipped") == n, proc.stdout
    with open(os.path.join(dest, "results.json")) as f:
        exported = json.load(f)
    with open(os.path.join(workdir, "results.json")) as f:
        original = json.load(f)
    assert exported["summary"] == original["summary"]
