"""Test set-up: 4 fake CPU devices (so data-parallel code is exercised), shared fixtures."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 4)
# Several tests build the same train step more than once (e.g. a run, then its resumption); a
# persistent compilation cache turns the repeated XLA compilations into cache hits. Shared with the
# multi-process tests' worker processes (tests/test_multihost.py).
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("MSPEC_TEST_JAX_CACHE")
    or os.path.join(tempfile.gettempdir(), "mspec_test_jax_cache"),
)

import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def qm9_sample_dir(tmp_path_factory):
    """A data directory holding the prepared 2,000-molecule `qm9/sample` dataset (built once).

    Set MSPEC_TEST_DATA_DIR to reuse a directory across test sessions.
    """
    from mspec.data import datasets

    data_dir = os.environ.get("MSPEC_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    datasets.get_builder("qm9/sample", data_dir)
    return data_dir
