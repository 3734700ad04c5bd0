import os
import sys

# Tests run on the CPU; subprocess tests set their own XLA_FLAGS for simulated devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
