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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
