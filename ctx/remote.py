"""Remote paths (gs://) checked before a run starts: a bucket that cannot be reached ends
in one line naming the config field, not after minutes of the storage client's retries."""

from __future__ import annotations

import socket

from etils import epath

from ctx.errors import InputError, MissingInput

# The endpoint each remote scheme's client talks to.
ENDPOINTS = {"gs": "storage.googleapis.com"}
CONNECT_SECONDS = 10


def is_remote(path: str) -> bool:
    return "://" in str(path)


def check_reachable(path: str, field: str, must_exist: bool = True) -> None:
    """Raise ValueError (FileNotFoundError if absent) naming `field` when a remote path cannot
    be used; local paths pass through."""
    if not is_remote(path):
        return
    scheme = str(path).split("://", 1)[0]
    if scheme not in ENDPOINTS:
        raise InputError(
            f"{field}={path}: the {scheme}:// scheme is not supported; use a gs:// or local path"
        )
    host = ENDPOINTS[scheme]
    try:  # a firewall or a missing DNS ends here in seconds, not after the client's retries
        socket.create_connection((host, 443), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise InputError(
            f"{field}={path} cannot be reached: no connection to {host} ({error}); check the "
            "network, or use a local copy"
        ) from None
    try:
        exists = epath.Path(path).exists()
    except ImportError as error:
        raise InputError(
            f"{field}={path} needs the {scheme}:// client ({error}); pip install gcsfs"
        ) from None
    except Exception as error:  # noqa: BLE001 - the storage client's errors vary by cause
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            f"{field}={path} cannot be read ({type(error).__name__}: {first}); check the "
            "bucket name and your credentials (gcloud auth application-default login)"
        ) from None
    if must_exist and not exists:
        raise MissingInput(f"{field}={path} does not exist")
