"""A MetricWriter on a gs:// workdir behind tests/gcs.py's fault proxy, through an outage of
metric uploads (503 for longer than the client's own ~30 s of retries) and a store still down
at the end; prints what read_metrics gives afterwards and what the end left in the local
spool, as JSON. (Each failed upload costs the client's retries: about 35 s.)"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.gcs import FaultProxy, GcsServer  # noqa: E402 - after the repository root is on the path

server = GcsServer()
proxy = FaultProxy(server.url)
os.environ.update(server.env(proxy.url))  # before the storage client is imported

from ctx.metrics import MetricWriter, read_metrics  # noqa: E402

PARTS = r"/metrics/part-"
workdir = server.path("run")
writer = MetricWriter(workdir, close_wait_seconds=1.0, close_retry_seconds=0.5)


def write(*steps):
    for step in steps:
        writer.write({"step": step, "loss": float(step)})


write(1, 2)
writer.flush(force=True)
proxy.fail(PARTS, "503")  # an outage of metric uploads
write(3, 4)
writer.flush(force=True)
proxy.heal()
write(5)
writer.flush(force=True)
write(6, 7)
writer.flush(force=True)
proxy.fail(PARTS, "503")  # down at the end
write(8)
spool = writer.close()
proxy.heal()
print(
    json.dumps(
        {
            "steps": [row["step"] for row in read_metrics(workdir)],
            "spooled": [json.loads(line)["step"] for line in open(spool)] if spool else None,
            "faulted": proxy.faulted,
        }
    )
)
proxy.stop()
server.stop()
