"""The file-level half of the run layer (``run.py``): atomic writes, the lock that makes a directory
one run's at a time, and the check of a stage's inputs against those its saved work came from.

Standard library only. A stage takes its directory through ``run.RunDir``; code that already runs
on the main process alone (a recipe's summary, a checkpoint's final files) writes with these directly.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a kill leaves the old file or the new one, never half
    of one that a resumed run would trust."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return replace_with(path, write)


def replace_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a file beside ``path``, then rename it onto ``path``. The rename replaces
    whatever ``path`` was, a symlink included, so a link planted in an output directory is never
    followed out of it; the temporary name is new and created exclusively (mkstemp), so it cannot
    be a planted link either. Any writer that takes a file name (savefig, to_parquet, safetensors)
    goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix stays, since writers such as savefig choose the format from it.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private; the result gets the usual permissions
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_into(directory: str | Path, save: Callable[[Path], None]) -> Path:
    """``save(folder)`` into a new folder inside ``directory``, then move each entry it wrote onto
    its name in ``directory`` (replacing a link or an older entry there), for writers that fill a
    directory (``save_pretrained``): what they write never goes through a planted link."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving.", dir=directory))
    try:
        save(staging)
        for entry in staging.iterdir():
            target = directory / entry.name
            if target.is_symlink():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


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
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"output directory {directory} is not writable: {err.strerror}") from err
    return directory


class DirectoryLocked(RuntimeError):
    """Another process is already running a stage in this output directory."""


# Directories this process holds, so that a stage inside another on the same directory (the CLI's
# lock around the library's) shares the one lock instead of being refused by its own process.
_HELD: dict[Path, list] = {}


class RunLock:
    """The one exclusive lock on an output directory for the life of a run (``with RunLock(out,
    "train"): ...``), whichever stage takes it: a second stage of any kind on the same directory is
    refused at once, naming the stage and pid that hold it.

    The lock is an ``fcntl`` lock on ``out/.lock``: the kernel drops it when the holder exits, even
    after ``kill -9``, so a stale lock file never blocks a resume. The file is opened without
    following a link (a planted ``.lock`` symlink is replaced, never written through). Taken again
    by the process that holds it, it is shared, not refused.
    """

    def __init__(self, directory: str | Path, what: str = "run"):
        self.directory, self.what = Path(directory), what
        self._key: Path | None = None

    def __enter__(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        fd = _open_lock_file(self.directory / ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                pid, _, stage = holder.partition(" ")
                raise DirectoryLocked(
                    f"{self.directory} is in use by another stage ({stage or 'unknown'}, pid {pid or 'unknown'}); "
                    f"wait for it to finish or give this {self.what} another output directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.what}".encode(), 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def __exit__(self, *exc) -> None:
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])
        self._key = None


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
    path.unlink()  # a symlink where the lock file belongs: remove the link, never its target
    return os.open(path, flags | os.O_EXCL, 0o644)


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
