"""config.init.zero_scalar_readout: a fresh scalar head whose first prediction is the target mean."""

import numpy as np
import pytest

from experiments.configs import finetune_qm9
from mspec.training import finetune, run_config


def _setup(qm9_sample_dir, zero: bool):
    c = finetune_qm9.get_config("tiny")
    c.data.data_dir = qm9_sample_dir
    c.init.zero_scalar_readout = zero
    return finetune.build(c)


def test_zero_readout_starts_every_prediction_at_the_mean(qm9_sample_dir):
    setup = _setup(qm9_sample_dir, zero=True)
    params = finetune.init_params(setup)
    pred = finetune.predict(setup, params, "validation", limit=40)
    expected = setup.standardizer.mean + pred["ref"]
    np.testing.assert_allclose(pred["y_pred"], expected, rtol=0, atol=1e-6)
    # Only the output column is zeroed: the rest of the head keeps its random init, so the
    # gradient reaches the kernel through non-zero hidden activations.
    last = params["scalar_head"]["blocks"]["output_network_1"]["update_net_2"]
    assert np.all(np.asarray(last["kernel"][:, 0]) == 0) and np.any(np.asarray(last["kernel"][:, 1]) != 0)

    default = _setup(qm9_sample_dir, zero=False)
    pred_default = finetune.predict(default, finetune.init_params(default), "validation", limit=40)
    assert np.max(np.abs(pred_default["y_pred"] - expected)) > 1e-3


def test_zero_readout_needs_a_property_head():
    with pytest.raises(ValueError, match="zero_scalar_readout: this model has no property head"):
        finetune.zero_scalar_readout({"representation": {}, "noise_head": {}})


def test_resuming_a_workdir_written_before_the_key_existed_is_allowed():
    stored = {"init": {"checkpoint": ""}, "total_steps": 5}
    current = {"init": {"checkpoint": "", "zero_scalar_readout": False}, "total_steps": 5}
    assert run_config.check_resume(stored, current, directory="d", step=1) == []
    with pytest.raises(run_config.ConfigError, match="init.zero_scalar_readout"):
        run_config.check_resume(stored, {"init": {"checkpoint": "", "zero_scalar_readout": True},
                                         "total_steps": 5}, directory="d", step=1)
