"""The one interface every generation backend offers."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .sampling import HintedDecodingConfig, SamplingConfig


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (its package is missing or cannot start)."""


class Backend(ABC):
    name: str = ""

    @abstractmethod
    def sample(
        self, prompt_ids: list[list[int]], config: SamplingConfig, seeds: list[int] | None = None
    ) -> list[list[list[int]]]:
        """Per prompt, config.n completions as token ids (a final end-of-sequence token included).

        `seeds` (one per prompt, optional) fixes each prompt's random streams whatever the batch
        (decoding.mixing.stream_seeds); without it they follow config.seed and the prompt's position.
        """

    @abstractmethod
    def two_stream(
        self, hinted_ids: list[list[int]], student_ids: list[list[int]], config: HintedDecodingConfig, tokenizer=None,
        seeds: list[int] | None = None,
    ) -> list[list[int]]:
        """Hinted Decoding (docs/methods.md §5): the generated ids of each (hinted, student) pair; `seeds`
        as in `sample`, one per pair."""

    @abstractmethod
    def update_weights(self, model) -> None:
        """Serve `model`'s current weights from now on (after a training step or round)."""

    def sleep(self) -> None:
        """Free the accelerator memory the backend holds while a trainer runs (no-op where there is none)."""

    def wake_up(self, model=None) -> None:
        """Serve again after `sleep`, with `model`'s weights when one is given."""
        if model is not None:
            self.update_weights(model)

    def close(self) -> None:
        """Release the engine's memory; the backend cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_prompts(hinted_ids: list[list[int]], student_ids: list[list[int]] | None = None) -> None:
    """Clear errors for the mistakes callers make: unequal pair counts, empty or non-int prompts."""
    if student_ids is not None and len(hinted_ids) != len(student_ids):
        raise ValueError(f"{len(hinted_ids)} hinted prompts but {len(student_ids)} student prompts: pass one of each per pair")
    for name, rows in (("hinted", hinted_ids), ("student", student_ids or [])):
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"{name} prompt {i} is empty: every prompt needs at least one token")
            if not all(isinstance(t, int) for t in row):
                raise TypeError(f"{name} prompt {i} must be a list of ints (token ids), got {type(row[0]).__name__}")
