"""A recipe's record of its stages, ``manifest.json``.

A recipe is a short script of named stages. ``Manifest.run(name, fn)`` runs a stage unless an
earlier run finished it, and records in ``manifest.json`` (written atomically after each stage)
its total wall time over all attempts and the number of attempts, so a resumed run reports what
the stage really cost. An attempt that raised adds its time; one killed outright (SIGKILL)
counts as an attempt whose time is unknown.

Under ``torchrun`` / ``accelerate launch`` every process runs every stage while only the main
process writes the record. The main process decides whether a stage is skipped and every process
follows it; the processes meet at the end of each stage, so none reads a file before the main
process has finished writing it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from onpolicy_sft.console import say
from onpolicy_sft.report import duration
from onpolicy_sft.run import in_step, is_main, main_decides, process_state
from onpolicy_sft.rundir import read_json, write_json

log = logging.getLogger(__name__)


class Manifest:
    """``manifest.json``: finished stages (seconds over all attempts, attempts, what they returned,
    how many processes ran them) and the number of processes of the latest run."""

    def __init__(self, path: str | Path, announce: Callable[[str], None] | None = say):
        self.path = Path(path)
        self.data = read_json(self.path, {"stages": {}})
        self.data.setdefault("stages", {})
        self.data.setdefault("unfinished", {})  # stage -> {attempts, seconds} of attempts that did not finish
        self.processes = process_state().num_processes
        self.data["processes"] = self.processes
        self.announce = announce

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def get(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def save(self) -> None:
        if is_main():
            write_json(self.path, self.data)

    def run(self, stage: str, fn: Callable[[], dict | None]) -> None:
        """Run ``fn`` as ``stage`` unless it finished before; what it returns goes into the record.
        Every process calls this for every stage; the main process's record decides."""
        if main_decides(self.done(stage)):
            log.info("%s: finished earlier, skipping", stage)
            return
        tried = self.data["unfinished"].setdefault(stage, {"attempts": 0, "seconds": 0.0})
        tried["attempts"] += 1
        self.save()
        log.info("%s: starting (attempt %d)", stage, tried["attempts"])
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            extra = fn() or {}
        except BaseException:
            tried["seconds"] = round(tried["seconds"] + time.perf_counter() - start, 2)
            self.save()
            raise
        seconds = time.perf_counter() - start
        self.data["unfinished"].pop(stage)
        entry = {
            "seconds": round(tried["seconds"] + seconds, 2), "attempts": tried["attempts"],
            "last_attempt_seconds": round(seconds, 2),
            # CPU seconds too: on a shared machine the wall time says more about the neighbours
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "processes": self.processes,
            **extra,
        }
        self.data["stages"][stage] = entry
        self.save()
        in_step()  # the stage's files and the record are written before any process goes on
        if self.announce:
            tries = f" ({entry['attempts']} attempts)" if entry["attempts"] > 1 else ""
            self.announce(f"{stage}: done in {duration(entry['seconds'])}{tries}")

    def seconds(self, stage: str) -> str:
        """The stage's time for a table: seconds, with the attempts when there were several."""
        entry = self.get(stage)
        if not entry:
            return "–"
        return f"{entry['seconds']:.0f}" + (f" ({entry['attempts']} tries)" if entry.get("attempts", 1) > 1 else "")
