import os
import sys
import tempfile

from tests import FAST_COMPILE_XLA_FLAG

# Tests run on the CPU; subprocess tests add flags for simulated devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs: a compilation cache shared by this run (and its
# subprocesses) turns repeated XLA compiles into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ctx-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAG}".strip()
# Implicit rank promotion (adding [H,K] to [B,N,H,K]) is an error everywhere, subprocesses included:
# it hides broadcasting bugs in the einsum-heavy attention and memory code.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The few-minute tier (`pytest -m "not slow"`) covers the model, attention, memory, ops, config
# and data; these modules run whole programs (subprocesses, training runs, many compiles) and
# are marked slow as a whole. CI runs everything.
SLOW_MODULES = {"test_bench", "test_evaluate", "test_launch", "test_multiprocess", "test_notebook",
                "test_reliability", "test_reproduce", "test_sample", "test_tpu_compile", "test_train"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs whole programs; left out of the fast tier (-m 'not slow')")


def pytest_collection_modifyitems(items):
    import pytest

    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
