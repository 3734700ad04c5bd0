"""The batch-shrinking evaluation case of tests/test_evaluate.py, on this process's devices, as JSON."""

import json

from tests.helpers import shrinking_case

print(json.dumps(shrinking_case()))
