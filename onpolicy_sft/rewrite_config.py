"""The settings of the corpus rewrite (onpolicy_sft/rewrite.py): what it samples, how it picks,
which rows it triages, and the fingerprint of the settings that change its rows."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from decoding.sampling import HintedDecodingConfig, SamplingConfig
from onpolicy_sft.hint_template import HintTemplate
from onpolicy_sft import ddt
from onpolicy_sft.rundir import digest

FALLBACKS = ("original", "drop")
TRIAGE_BY = ("off", "p_value", "phi")
# The levels a test flags at by default: the per-row 1% test of docs/methods.md §1, and the mean φ
# below which the DDT authors read a text as out of distribution.
TRIAGE_LEVELS = {"p_value": ddt.REJECT_LEVEL, "phi": -0.1}
# Settings added after corpora were recorded: left out of the fingerprint while at these defaults,
# so that a default run keeps the config_hash (and the resumable runs) it had before them.
ADDED_DEFAULTS = {"triage.by": "off", "triage.level": None, "keep_verified": 1, "adaptive": False,
                  "template.exemplars": True}


@dataclass
class TriageConfig:
    """DDT triage before the rewrite: ``by`` "p_value" flags a row whose p-value is below
    ``level`` (default 0.01), "phi" one whose mean φ is below ``level`` (default −0.1); only
    flagged rows are rewritten. "off": every row is rewritten."""

    by: str = "off"
    level: float | None = None

    def __post_init__(self):
        if self.by not in TRIAGE_BY:
            raise ValueError(f"by: must be one of {TRIAGE_BY}, got {self.by!r}")
        if self.level is None:
            return
        if self.by == "off":
            raise ValueError("level: a level needs a test; set triage.by to p_value or phi")
        if not math.isfinite(self.level) or (self.by == "p_value" and not 0 < self.level < 1):
            raise ValueError(f"level: must be {'in (0, 1)' if self.by == 'p_value' else 'finite'}, got {self.level}")

    @property
    def threshold(self) -> float:
        return TRIAGE_LEVELS[self.by] if self.level is None else self.level


@dataclass
class RewriteConfig:
    """Settings of the corpus rewrite. ``sampling`` drives the k self-answers (its n is replaced by
    k_self and its seed by the per-row seeds); ``hinted`` drives the m hinted attempts and names the
    backend. ``analysis`` turns on the stage-1 analysis prefix of the hint template.
    ``keep_verified``, ``adaptive`` and ``triage``: the docstring of onpolicy_sft/rewrite.py."""

    k_self: int = 4
    m_hinted: int = 4
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512))
    hinted: HintedDecodingConfig = field(default_factory=HintedDecodingConfig)
    template: HintTemplate = field(default_factory=HintTemplate)
    analysis: bool = False
    analysis_max_new_tokens: int = 160
    fallback: str = "original"
    shard_size: int = 16
    seed: int = 0
    verify_timeout: float = 5.0
    score: bool = True
    score_batch_tokens: int = 4096
    model_name: str = ""  # provenance only; default: the model's name_or_path
    progress: bool = True
    keep_verified: int = 1
    adaptive: bool = False
    triage: TriageConfig = field(default_factory=TriageConfig)

    def __post_init__(self):
        if self.k_self < 0 or self.m_hinted < 0:
            raise ValueError(f"RewriteConfig.k_self and m_hinted must be >= 0, got {self.k_self} and {self.m_hinted}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"RewriteConfig.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.shard_size < 1:
            raise ValueError(f"RewriteConfig.shard_size must be >= 1, got {self.shard_size}")
        if self.keep_verified < 1:
            raise ValueError(f"keep_verified: must be >= 1, got {self.keep_verified}")

    def settings(self) -> dict:
        """Every setting that changes the rows, flattened ("hinted.beta": 3.0), so that a refused
        resume names the field that changed. Not the progress display or the provenance label."""
        flat: dict = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                flat[prefix] = value

        walk("", {k: v for k, v in dataclasses.asdict(self).items() if k not in ("progress", "model_name")})
        return without_added_defaults(flat)

    def fingerprint(self) -> str:
        """A short hash of ``settings()``."""
        return digest(self.settings())


def without_added_defaults(flat: dict, prefix: str = "") -> dict:
    """``flat`` (dotted names under ``prefix``) less the ADDED_DEFAULTS settings at their defaults."""
    missing = object()
    return {k: v for k, v in flat.items()
            if not (k.startswith(prefix) and ADDED_DEFAULTS.get(k[len(prefix):], missing) == v)}
