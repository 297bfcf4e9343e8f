"""The entry points' error reporting (mspec/training/cli.py): config mistakes and run failures
are one `error:` line naming the key or file, not a traceback; evaluate on a pre-training
workdir says what it evaluates."""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import pretrain_frad
from mspec.training import finetune, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, MSPEC_MALLOC_TUNING="0", JAX_PLATFORMS="cpu")
    env.pop("MSPEC_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,status,line", [
    (["--config", "experiments/configs/pretrain_frad.py:tiny", "--config.optim.lrr=1"], 2,
     """pretrain.py: error: --config.optim.lrr: the config has no key 'lrr'. Did you mean "lr" instead of "lrr"?"""),
    (["--config", "experiments/configs/nope.py"], 2,
     "pretrain.py: error: --config: config file 'experiments/configs/nope.py' not found"),
    (["--config", "experiments/configs/pretrain_frad.py:huge"], 2,
     "Error whilst parsing config file: ValueError: unknown variant 'huge'"),
    (["--config", "experiments/configs/pretrain_frad.py:tiny", "--config.checkpoint_every=0"], 1,
     "pretrain.py: error: config.checkpoint_every must be an integer >= 1, got 0"),
])
def test_config_mistakes_are_one_line(tmp_path, args, status, line):
    proc = _run("experiments.pretrain", "--workdir", str(tmp_path / "w"), *args)
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_load_config_parses_overrides_as_the_entry_points_do():
    from mspec.training import cli

    config = cli.load_config(["--config=experiments/configs/finetune_qm9.py:homo", "--config.seed=5",
                              "--config.evaluate.checkpoints=('best',)", "--config.optim.lr=1e-3"])
    assert config.seed == 5 and config.evaluate.checkpoints == ("best",) and config.optim.lr == 1e-3
    assert config.target.name == "homo"
    # Another config in the same process: each call has its own flag registry.
    assert cli.load_config(["--config=experiments/configs/pretrain_frad.py:tiny"]).total_steps > 0


@pytest.mark.parametrize("args,message", [
    (["--config=experiments/configs/pretrain_frad.py:tiny", "--config.optim.lrr=1"],
     """--config.optim.lrr: the config has no key 'lrr'. Did you mean "lr" instead of "lrr"?"""),
    (["--config=experiments/configs/nope.py"],
     "--config: config file 'experiments/configs/nope.py' not found"),
    (["--config=experiments/configs/pretrain_frad.py:huge"],
     "Error whilst parsing config file: ValueError: unknown variant 'huge'"),
    (["--config=experiments/configs/pretrain_frad.py:tiny", "--config.seed=abc"],
     "flag --config.seed=abc: invalid literal for int()"),
])
def test_load_config_mistakes_are_one_line_value_errors(args, message):
    from mspec.training import cli

    with pytest.raises(ValueError) as e:
        cli.load_config(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_evaluate_on_a_pretraining_workdir_says_what_it_evaluates(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(json.loads(pretrain_frad.get_config("tiny").to_json_best_effort()), f)
    with pytest.raises(run_config.ConfigError, match="is a pre-training workdir .* evaluates fine-tuning workdirs"):
        finetune.evaluate_workdir(str(tmp_path))
    proc = _run("experiments.evaluate", "--workdir", str(tmp_path))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
