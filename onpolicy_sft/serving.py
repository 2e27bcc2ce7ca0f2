"""The one generation backend of a run, and which weights it serves.

A recipe opens one backend for its whole life (``open_backend``) and switches its weights only
when a stage needs others (``Served``); it sleeps while a model trains.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from decoding import BackendUnavailable, make_backend
from onpolicy_sft.console import native_output_to_log
from onpolicy_sft.manifest import Manifest
from onpolicy_sft.models import load_model

log = logging.getLogger(__name__)


def open_backend(name: str, model, tokenizer, options: dict, *, trust_remote_code: bool = False) -> tuple[Any, str | None]:
    """The run's one backend; vLLM falls back to hf where it cannot start (said once, returned as a note).
    ``trust_remote_code`` reaches the vLLM engine, which loads the model again itself."""
    if name == "vllm":
        # The engine's weight-loading bar repeats the stage's own; its log lines go to the run log.
        engine = {"use_tqdm_on_load": False, **(options.get("engine_kwargs") or {})}
        if trust_remote_code:
            engine["trust_remote_code"] = True
        options = {**options, "engine_kwargs": engine}
        try:
            with native_output_to_log():
                return make_backend("vllm", model, tokenizer, **options), None
        except BackendUnavailable as err:
            note = f"vLLM is not available here ({err}); using the hf backend for all generation"
            log.warning(note)
            if isinstance(model, (str, Path)):  # the checkpoint the engine was to read: hf generates in memory
                model, loaded = load_model(str(model))
                tokenizer = tokenizer or loaded
            return make_backend("hf", model, tokenizer), note
    return make_backend(name, model, tokenizer, **options), None


class Served:
    """Which weights the backend serves, so a stage switches it only when it needs other weights;
    each switch's time goes into the manifest under ``weight_updates``."""

    def __init__(self, backend, key: str, manifest: Manifest):
        self.backend, self.key, self.manifest = backend, key, manifest

    def ensure(self, key: str, model, stage: str) -> None:
        if key == self.key:
            return
        start = time.perf_counter()
        self.backend.wake_up(model)
        self.manifest.data.setdefault("weight_updates", []).append(
            {"for": stage, "seconds": round(time.perf_counter() - start, 3)})
        self.manifest.save()
        self.key = key

    def sleep(self) -> None:
        """Hand the accelerator to a trainer (vLLM's sleep mode on GPUs); the next ``ensure`` wakes
        the engine with the weights it asks for."""
        self.backend.sleep()
        self.key = None
