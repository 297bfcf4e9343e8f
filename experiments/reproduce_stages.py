"""The stages of the reproduction study: what each runs, in what order, and whether it is done.

A stage is one ``experiments.pretrain`` or ``experiments.finetune`` run in its own workdir
(``<study>/<stage name>``), started as a subprocess with the study's overrides. The study plan is
a pure function of the protocol (``experiments/configs/reproduce.py``), so a re-run sees the same
stages, skips the finished ones and resumes the others from their own checkpoints (the trainers
resume exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PRETRAIN_ARMS = ("coord", "frad")  # stage 1 arms
STAGE2_ARMS = ("molspectra", "coord_control")  # stage 2 arms, both from the coord checkpoint


@dataclasses.dataclass(frozen=True)
class Stage:
    """One run of the study.

    Attributes:
      name: ``pretrain/<arm>`` or ``finetune/<target>/<arm>/seed<k>``; also its workdir below the study.
      module: the entry point (``experiments.pretrain`` / ``experiments.finetune``).
      config: ``path.py[:variant]`` of the experiment config.
      overrides: ``{config key: value}`` passed as ``--config.KEY=VALUE``.
      needs: names of the stages whose output this one reads.
      steps: training steps of the stage.
      estimate_s: estimated wall time (from the protocol's measured step times).
      arm, target, seed: what the stage belongs to (``target``/``seed`` empty for pre-training).
    """

    name: str
    module: str
    config: str
    overrides: tuple[tuple[str, object], ...]
    needs: tuple[str, ...]
    steps: int
    estimate_s: float
    arm: str
    target: str = ""
    seed: int = 0

    @property
    def kind(self) -> str:
        return self.name.split("/", 1)[0]

    def workdir(self, study_dir: str) -> str:
        return os.path.join(study_dir, *self.name.split("/"))

    def command(self, study_dir: str, python: str = sys.executable, launcher: str = "") -> list[str]:
        """The stage's command line. ``launcher`` (e.g. ``"./launch.sh tpu --name P --zone Z"``)
        starts the pre-training stages instead of plain ``python -m`` (multi-host); fine-tuning
        runs in one process, so it always starts directly."""
        if launcher and self.kind == "pretrain":
            head = shlex.split(launcher) + [self.module]
        else:
            head = [python, "-m", self.module]
        config, *overrides = self.config_args(study_dir)
        return head + [config, f"--workdir={self.workdir(study_dir)}"] + overrides

    def config_args(self, study_dir: str) -> list[str]:
        """``--config=...`` and one ``--config.KEY=VALUE`` per override: the stage's config as
        the entry points (and :func:`mspec.training.cli.load_config`) parse it."""
        args = [f"--config={self.config}"]
        for key, value in self.overrides:
            if key == "init_from.checkpoint" or key == "init.checkpoint":
                value = os.path.join(study_dir, *str(value).split("/"))
            args.append(f"--config.{key}={format_value(value)}")
        return args


def format_value(value) -> str:
    """A config value as ml_collections' flag parser reads it."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _config_path(name: str, variant: str = "") -> str:
    path = os.path.relpath(os.path.join(CONFIG_DIR, name))
    if path.startswith(".."):
        path = os.path.join(CONFIG_DIR, name)
    return path + (f":{variant}" if variant else "")


def _encoder_overrides(p) -> list[tuple[str, object]]:
    e = p.encoder
    return [(f"model.{k}", e[k]) for k in
            ("hidden", "num_layers", "num_rbf", "num_heads", "interlayer_norm", "cutoff")]


def _run_overrides(block, seed: int) -> list[tuple[str, object]]:
    """Seed, data, batch, length and optimiser of one stage block of the protocol."""
    return [
        ("seed", seed),
        ("data.dataset", block.dataset),
        ("batch_size", block.batch_size),
        ("total_steps", block.steps),
        ("optim.lr", block.lr),
        ("optim.warmup_steps", block.warmup_steps),
        ("optim.schedule", block.schedule),
    ]


def _pretrain_common(p, block) -> list[tuple[str, object]]:
    return _run_overrides(block, p.pretrain_seed) + [
        ("log_every", block.log_every),
        ("eval_every", block.eval_every),
        ("checkpoint_every", block.checkpoint_every),
        ("data.eval_max_molecules", block.eval_max_molecules),
    ] + ([("data.source_dir", block.source_dir)] if block.get("source_dir") else [])


def pretrain_stages(p) -> list[Stage]:
    cost = p.cost
    stages = []
    for arm in PRETRAIN_ARMS:
        over = _encoder_overrides(p) + _pretrain_common(p, p.pretrain)
        stages.append(Stage(
            name=f"pretrain/{arm}", module="experiments.pretrain",
            config=_config_path(f"pretrain_{arm}.py"), overrides=tuple(over), needs=(),
            steps=p.pretrain.steps,
            estimate_s=cost.pretrain_startup_s + p.pretrain.steps * cost.pretrain_step_s, arm=arm,
        ))
    s2 = p.stage2
    for arm in STAGE2_ARMS:
        over = _encoder_overrides(p) + _pretrain_common(p, s2) + [
            ("init_from.checkpoint", "pretrain/coord"),
            ("specformer.embed_dim", p.encoder.hidden),
        ]
        over += [(f"specformer.{k}", v) for k, v in sorted(s2.specformer.items())]
        over += [(f"spectra.patch_len.{k}", v) for k, v in sorted(s2.patch_len.items())]
        over += [(f"spectra.stride.{k}", v) for k, v in sorted(s2.stride.items())]
        if arm == "coord_control":
            # Same molecules, batches, noise and optimiser; the spectral terms weigh nothing.
            over += [("loss.mpr_weight", 0.0), ("loss.contrastive_weight", 0.0)]
        stages.append(Stage(
            name=f"pretrain/{arm}", module="experiments.pretrain",
            config=_config_path("pretrain_molspectra.py"), overrides=tuple(over),
            needs=("pretrain/coord",), steps=s2.steps,
            estimate_s=cost.pretrain_startup_s + s2.steps * cost.stage2_step_s, arm=arm,
        ))
    return [s for s in stages if s.arm in p.arms or
            (s.arm == "coord" and any(a in p.arms for a in STAGE2_ARMS))]


def _finetune_common(p, block, seed: int, arm: str) -> list[tuple[str, object]]:
    over = _encoder_overrides(p) + _run_overrides(block, seed) + [
        ("eval_every", block.eval_every),
        ("checkpoint_every", block.eval_every),
        ("log_every", block.log_every),
        ("keep_checkpoints", 1),
        # Model selection on validation: only the best-validation checkpoint is evaluated on test.
        ("evaluate.checkpoints", ("best",)),
    ]
    if block.get("manual_dir"):
        over.append(("data.manual_dir", block.manual_dir))
    for item in block.get("extra", ()):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"protocol extra {item!r}: expected 'KEY=VALUE' (a fine-tuning "
                             "config key and its value)")
        over.append((key, value))
    if arm != "scratch":
        over.append(("init.checkpoint", f"pretrain/{arm}"))
    return over


def finetune_stages(p) -> list[Stage]:
    """Seed-major order: after the first seed every arm and target has one result."""
    cost = p.cost
    out = []
    downstream = [(t, "qm9") for t in p.qm9.targets] + ([(p.md17.molecule, "md17")]
                                                        if p.md17.molecule else [])
    for seed in p.seeds:
        for target, task in downstream:
            for arm in p.arms:
                if task == "qm9":
                    block = p.qm9
                    over = _finetune_common(p, block, seed, arm) + [
                        ("data.eval_max_molecules", block.eval_max_molecules),
                        ("evaluate.validation_max_molecules", block.eval_max_molecules),
                        ("model.message_passing", block.message_passing),
                    ]
                    if block.num_labels:
                        over.append(("data.train_split", f"train[:{block.num_labels}]"))
                    config = _config_path("finetune_qm9.py", target)
                    step_s = cost.qm9_step_s
                else:
                    block = p.md17
                    # XLA ops unless the protocol says otherwise: every protocol so far was
                    # recorded (and its MD17 stages run) before the fused kernels could train on
                    # forces, and a resumed study must repeat its steps exactly.
                    over = _finetune_common(p, block, seed, arm) + [
                        ("model.message_passing", block.get("message_passing", "xla"))]
                    config = _config_path("finetune_md17.py", target + (",real" if block.get("real") else ""))
                    step_s = cost.md17_step_s
                out.append(Stage(
                    name=f"finetune/{target}/{arm}/seed{seed}", module="experiments.finetune",
                    config=config, overrides=tuple(over),
                    needs=() if arm == "scratch" else (f"pretrain/{arm}",),
                    steps=block.steps,
                    estimate_s=cost.finetune_startup_s + block.steps * step_s,
                    arm=arm, target=target, seed=seed,
                ))
    return out


def plan(p: ml_collections.ConfigDict) -> list[Stage]:
    """Every stage of the study, in the order they run (dependencies first)."""
    unknown = set(p.arms) - {"scratch", *PRETRAIN_ARMS, *STAGE2_ARMS}
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)} in the protocol")
    return pretrain_stages(p) + finetune_stages(p)


# --------------------------------------------------------------------------------------------------
# Stage status on disk
# --------------------------------------------------------------------------------------------------

STATUS_FILE = "stage.json"


def read_status(stage_dir: str) -> dict:
    path = os.path.join(stage_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return {"status": "pending", "attempts": []}
    with open(path) as f:
        return json.load(f)


def write_status(stage_dir: str, status: dict) -> None:
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, STATUS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(status, f, indent=1)
    os.replace(path + ".tmp", path)


def checkpoint_steps(directory: str) -> list[int]:
    """Finished orbax steps in ``directory`` (``<step>/state`` exists)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def outputs_complete(stage: Stage, stage_dir: str) -> bool:
    """Whether the stage's outputs exist: a checkpoint at its last step (pre-training) or a
    ``results.json`` with the best-validation checkpoint evaluated (fine-tuning)."""
    if stage.kind == "pretrain":
        steps = checkpoint_steps(os.path.join(stage_dir, "checkpoints"))
        return bool(steps) and steps[-1] >= stage.steps
    path = os.path.join(stage_dir, "results.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        results = json.load(f)
    return "test" in results.get("best", {})
