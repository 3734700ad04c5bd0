import os
import sys
import tempfile

from tests import FAST_COMPILE_XLA_FLAG

# Tests run on the CPU; subprocess tests add flags for simulated devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs: a compilation cache shared by this run (and its
# subprocesses) turns repeated XLA compiles into cache hits.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ctx-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAG}".strip()
# Implicit rank promotion (adding [H,K] to [B,N,H,K]) is an error everywhere, subprocesses included:
# it hides broadcasting bugs in the einsum-heavy attention and memory code.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: whole programs or ahead-of-time compiles (Mosaic, CUDA); each slow "
        "file, class or test says so where it is; left out of the fast tier (-m 'not slow')",
    )
