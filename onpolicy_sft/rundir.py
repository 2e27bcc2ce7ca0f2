"""What every resumable stage does with its output directory: atomic writes, one run at a time,
and a fingerprint of its inputs so that a resume with other inputs is refused, not mixed in.

A leaf module (standard library only), so every stage, in ``onpolicy_sft`` and ``decoding``
alike, writes and guards its directory the same way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a kill leaves the old file or the new one, never half
    of one that a resumed run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=float) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` and prove a file can be written there, before any expensive work."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(err.errno, f"output directory {directory} is not writable: {err.strerror}") from err
    return directory


class DirectoryLocked(RuntimeError):
    """Another process is already running a stage in this output directory."""


class RunLock:
    """An exclusive lock on an output directory for the life of a run (``with RunLock(out): ...``).

    The lock is an ``fcntl`` lock on ``out/.lock``: the kernel drops it when the holder exits, even
    after ``kill -9``, so a stale lock file never blocks a resume. A second run on the same
    directory is refused at once with the holder's pid.
    """

    def __init__(self, directory: str | Path, what: str = "run"):
        self.directory, self.what = Path(directory), what
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DirectoryLocked(
                    f"{self.directory} is in use by another {self.what} (pid {holder}); wait for it to finish "
                    "or choose another output directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def digest(value: Any) -> str:
    """A stable short hash of a JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class InputsChanged(RuntimeError):
    """A resumable stage was rerun with inputs other than those its saved work came from."""


def check_fingerprint(path: str | Path, inputs: dict[str, Any], what: str) -> None:
    """Record ``inputs`` (what determines a stage's result: config, data digest, model identity) in
    ``path`` on the first run; on a resume, refuse if any of them differs, naming each difference.

    Values are compared as JSON, so keep them JSON-able and small (digests, not datasets).
    """
    path = Path(path)
    current = json.loads(json.dumps(inputs, sort_keys=True, default=str))
    saved = read_json(path)
    if saved is None:
        write_json(path, current)
        return
    differ = [
        f"{key}: was {_short(saved.get(key))}, now {_short(current.get(key))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differ:
        raise InputsChanged(
            f"{path.parent} holds a {what} started with other inputs ({'; '.join(differ)}). "
            "Rerun with the original inputs to resume, or use another output directory."
        )


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
