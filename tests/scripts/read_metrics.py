"""Every metric row of the run in argv[1] (ctx.metrics.read_metrics; a gs:// workdir through
the storage client this process's environment points at), as one JSON list."""

import json
import sys

from ctx.metrics import read_metrics

print(json.dumps(read_metrics(sys.argv[1])))
