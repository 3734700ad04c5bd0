"""Remote paths (gs://) checked before a run starts: a bucket that cannot be reached ends
in one line naming the config field, not after minutes of the storage client's retries."""

from __future__ import annotations

import os
import socket
import urllib.parse

from etils import epath

from ctx.errors import InputError, MissingInput

# The endpoint each remote scheme's client talks to (unless an emulator is named: `endpoint`).
ENDPOINTS = {"gs": "storage.googleapis.com"}
CONNECT_SECONDS = 10


def endpoint(scheme: str) -> tuple[str, int]:
    """(host, port) that the `scheme`'s clients talk to: for gs://, STORAGE_EMULATOR_HOST when it
    is set (an emulator or a private endpoint; gcsfs and tensorstore follow it too), else
    Google's."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "") if scheme == "gs" else ""
    if emulator:
        url = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        return url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)
    return ENDPOINTS[scheme], 443


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
    host, port = endpoint(scheme)
    try:  # a firewall or a missing DNS ends here in seconds, not after the client's retries
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise InputError(
            f"{field}={path} cannot be reached: no connection to {host}:{port} ({error}); check "
            "the network (and STORAGE_EMULATOR_HOST where set), or use a local copy"
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


def check_output(path: str, field: str) -> None:
    """An output file a command will write, checked before any work: on gs://, a reachable
    store; locally, an existing folder that this process may write (a read-only file system or
    a missing permission is the user's one line, not an OSError after the work)."""
    if is_remote(path):
        check_reachable(path, field, must_exist=False)
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MissingInput(f"{field}={path}: its folder does not exist")
    _check_writable(path if os.path.exists(path) else folder, path, field)


def check_workdir(path: str, field: str) -> None:
    """A folder a command writes into (created if missing), checked before any work: on gs://, a
    reachable store; locally, a folder (or the nearest existing parent) this process may write."""
    check_reachable(path, field, must_exist=False)
    if is_remote(path):
        if epath.Path(path).exists() and not epath.Path(path).is_dir():
            raise InputError(f"{field}={path} exists and is not a directory")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{field}={path} exists and is not a directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _check_writable(existing, path, field)


def _check_writable(target: str, path: str, field: str) -> None:
    read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    if read_only or not os.access(target, os.W_OK):
        why = "a read-only file system" if read_only else "no permission to write"
        raise InputError(f"{field}={path}: {target} cannot be written ({why}); nothing was changed")
