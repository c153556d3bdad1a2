"""Shared pytest fixtures.

float64 is switched on per test through the ``x64`` fixture, never inside library code.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI's persistent compilation cache stays off in tests (cli.main runs in-process and would write to the
# user's cache directory); tests/test_report.py checks the cache settings themselves.
os.environ.setdefault("LCNN_JAX_COMPILATION_CACHE", "0")
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
    # For the same reason the library's automatic unrolling of short loops (a run-time speed-up on XLA:CPU that
    # multiplies the size of the compiled program) is off: the estimators' and the attacks' loops stay rolled.
    # Unrolling changes how a loop is compiled, not what it computes; tests about unrolling pass ``unroll=`` or
    # restore MAX_AUTO_UNROLL themselves.
    from lcnn_jax import loops as _loops

    _loops.MAX_AUTO_UNROLL = 0

# The longest tests start first, so that the two workers finish together instead of one idling at the end.
_LONGEST_FIRST = ("test_sharpness.py::test_traces_match_dense_hessian", "test_certified.py::test_certificates",
                  "test_bounds.py::test_bound_of_a_model_defined_here", "test_measures.py::test_local_lipschitz_float32",
                  "test_measures.py::test_input_curvature_linear_softmax", "test_lcnn.py::test_spectral_conv_true",
                  # the slow group's longest, for CI's -m slow run
                  "test_dataset_hessian.py::test_dataset_trace", "test_sweep.py::test_train_seeds",
                  "test_training.py::test_cli_missing", "test_smalldata_study.py::")


def pytest_collection_modifyitems(session, config, items):
    rank = lambda item: next((i for i, key in enumerate(_LONGEST_FIRST) if key in item.nodeid), len(_LONGEST_FIRST))  # noqa: E731
    items.sort(key=rank)  # stable: the rest keep their order
