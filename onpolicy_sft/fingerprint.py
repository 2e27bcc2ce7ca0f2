"""What a run's results depend on, as its fingerprint records it (``run.RunDir``): the config by
dotted field name, less the fields a resume may change (the display, more of the same work), and
the starting model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onpolicy_sft.config_io import to_dict


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so that a fingerprint mismatch names the exact field."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_fingerprint(config, display: tuple[str, ...]) -> dict[str, Any]:
    """The config's values by dotted name, minus the ``display`` fields (prefixes) that do not
    change any result."""
    return {k: v for k, v in flatten(to_dict(config)).items()
            if not any(k == d or k.startswith(d + ".") for d in display)}


def model_identity(path: str) -> dict[str, Any]:
    """A model by its resolved path and its weight files' names and sizes (cheap; no hashing of GBs)."""
    folder = Path(path)
    files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    return {"model.path": str(path), "model.weights": files}

