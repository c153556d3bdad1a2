"""Shared pytest fixtures.

float64 is switched on per test through the ``x64`` fixture, never inside library code.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax
import pytest


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


# The suite's cost is XLA compilation of many tiny programs, not running them: compile them unoptimised (tests
# that need speed at run time re-enable optimisation locally). LCNN_TEST_OPTIMIZE=1 restores the default.
if os.environ.get("LCNN_TEST_OPTIMIZE") != "1":
    jax.config.update("jax_disable_most_optimizations", True)

# The longest tests start first, so that the two workers finish together instead of one idling at the end.
_LONGEST_FIRST = ("test_dataset_hessian.py::test_dataset_trace", "test_lcnn.py::test_training_with",
                  "test_sharpness.py::test_traces_match_dense_hessian", "test_sweep.py::test_train_seeds",
                  "test_smalldata_study.py::", "test_training.py::test_cli_missing")


def pytest_collection_modifyitems(session, config, items):
    rank = lambda item: next((i for i, key in enumerate(_LONGEST_FIRST) if key in item.nodeid), len(_LONGEST_FIRST))  # noqa: E731
    items.sort(key=rank)  # stable: the rest keep their order
