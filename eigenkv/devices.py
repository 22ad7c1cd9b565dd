"""Models spread over devices by accelerate (``load_model(..., device_map=...)``): where each part computes, and
its offloaded weights.

accelerate places such a model with hooks (``AlignDevicesHook``, in a module's ``_hf_hook``): each decoder layer
computes on its *execution device*, and the hook moves the layer's inputs there. A layer whose weights are
*offloaded* (device map entries ``"cpu"`` with execution on a GPU, or ``"disk"`` with an offload folder) holds
its parameters on the ``meta`` device; the hook of each of its leaf modules loads them from a *weights map*
(CPU memory, or files) before the module's forward and drops them after. Nothing of eigenkv may therefore read a
parameter of such a module directly, nor assume one device for the whole model:

- :func:`execution_device` says where a module computes (its hook's device, else its tensors');
  :func:`input_device` where token ids go; :func:`layer_devices` where each layer's cache lives.
- :func:`onloaded` loads every offloaded weight of a module (through its own hooks) for a block of code, e.g.
  to fold bases into them or to digest them.
- :func:`place_like` gives a module built from another (the rank-space twin of an attention module) the same
  placement: the input-aligning hook the original had and, when the original's weights were offloaded, its
  own new weights offloaded the same way (into CPU memory, or as files in the offload folder for a
  disk-offloaded layer), so that folding never leaves an offloaded layer's weights on its execution device.

Everything here is a no-op for a model without hooks (one device, or moved by hand).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import torch
from torch import nn

OFFLOAD_HINT = (
    "load the model without offloading (a device_map whose every entry is a device with room for its layers, "
    "or device_map=None)"
)


def hooks(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` (a ``SequentialHook`` unpacked); [] without any."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def offload_hooks(module: nn.Module) -> list:
    """The hooks of ``module`` that keep its own weights offloaded (on ``meta`` between forwards)."""
    return [h for h in hooks(module) if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def is_offloaded(module: nn.Module) -> bool:
    """Whether some weight of ``module`` or of its submodules is offloaded by an accelerate hook."""
    return any(offload_hooks(m) for m in module.modules())


def _device(value) -> torch.device:
    if isinstance(value, int):  # accelerate names GPUs by index
        return torch.device("cuda", value)
    return torch.device(value)


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: the execution device of its own accelerate hook or, failing that, of the first
    hooked submodule; without hooks, the device of its first tensor not on ``meta``; None when it has neither."""
    for sub in module.modules():
        for hook in hooks(sub):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return _device(device)
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: where its input embeddings compute (the first parameter's device for a model
    on one device; never ``meta``, even when the embeddings are offloaded)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = None if embeddings is None else execution_device(embeddings)
    return device or execution_device(model) or torch.device("cpu")


def layer_devices(model: nn.Module) -> dict[int, torch.device]:
    """``{layer index: execution device}`` of every module that names its ``layer_idx`` (attention modules and,
    in some models, the decoder layers): where that layer's keys and values, and so its cache, live."""
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and layer not in devices:
            device = execution_device(module)
            if device is not None:
                devices[layer] = device
    return devices


@contextmanager
def onloaded(module: nn.Module, recurse: bool = True) -> Iterator[nn.Module]:
    """Within the block, every offloaded weight of ``module`` and its submodules is loaded on its execution
    device by its own hook (accelerate's ``align_module_device``, for a whole subtree); after it, they are
    offloaded again, and any change made to them is dropped. A no-op for a module without offloaded weights.

    ``recurse=False``: only the hooks on ``module`` itself (those that load its submodules' weights too, as
    accelerate's ``preload_module_classes`` places them), for code that calls the submodules, whose own hooks
    load their weights."""
    loaded = []
    try:
        for sub in module.modules() if recurse else (module,):
            for hook in offload_hooks(sub):
                hook.pre_forward(sub)
                loaded.append((sub, hook))
        yield module
    finally:
        for sub, hook in reversed(loaded):
            hook.post_forward(sub, None)


def place_like(original: nn.Module, new: nn.Module, *, offload: bool = True) -> nn.Module:
    """Give ``new`` (built from ``original``, its new weights on ``original``'s execution device) the placement
    accelerate gave ``original``, in place:

    - an input-aligning hook like the one ``original`` had on itself (same execution device, same keys left
      alone), so that ``new`` is called exactly as ``original`` was;
    - with ``offload`` and ``original``'s weights offloaded: every submodule of ``new`` that holds weights and no
      hook yet gets an offloading hook on the same execution device. Its new weights (the folded projections)
      move into a weights map of their own: CPU memory, or files in the offload folder when ``original`` was
      offloaded to disk (named by a digest of their contents, so equal weights share a file and no file is
      ever rewritten with other contents). A submodule reused from ``original`` whose weights a hook on
      ``original`` itself loaded (accelerate's ``preload_module_classes``) reads them from that hook's map.

    Returns ``new``.
    """
    own = next((h for h in hooks(original) if getattr(h, "execution_device", None) is not None), None)
    source = next((h for m in original.modules() for h in offload_hooks(m)), None)
    if own is None and source is None:
        return new
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils.offload import PrefixedDataset

    if own is not None:
        add_hook_to_module(
            new, AlignDevicesHook(execution_device=own.execution_device, io_same_device=own.io_same_device,
                                  skip_keys=own.skip_keys),
        )  # fmt: skip
    if not offload or source is None:
        return new
    folder = _disk_folder(source)
    names = {id(m): name for name, m in original.named_modules()}
    for sub in new.modules():
        weights = dict(sub.named_parameters(recurse=False))
        if not weights or any(getattr(h, "offload", False) for h in hooks(sub)):
            continue
        if any(w.device.type == "meta" for w in weights.values()):  # reused, its weights held by original's hook
            if id(sub) not in names:
                raise ValueError(
                    f"cannot place the folded {type(original).__name__}: its {type(sub).__name__} has offloaded "
                    f"weights and no hook that loads them; {OFFLOAD_HINT}"
                )
            weights_map = PrefixedDataset(source.weights_map, f"{names[id(sub)]}.")
        else:
            tensors = {name: w.detach().to("cpu") for name, w in weights.items()}
            weights_map = tensors if folder is None else _write_offloaded(tensors, folder)
        if hooks(sub):  # an input-aligning hook only: replaced by the offloading one, which aligns too
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(sub)
        hook = AlignDevicesHook(execution_device=source.execution_device, offload=True, weights_map=weights_map)
        add_hook_to_module(sub, hook)
    return new


def _disk_folder(hook) -> Path | None:
    """The offload folder of a hook whose weights are read from disk (accelerate's ``OffloadedWeightsLoader``
    without them in memory); None for weights held in CPU memory."""
    weights_map = hook.weights_map
    loader = getattr(weights_map, "dataset", weights_map)
    prefix = getattr(weights_map, "prefix", "")
    folder = getattr(loader, "save_folder", None)
    index, memory = getattr(loader, "index", None), getattr(loader, "state_dict", None)
    if folder is None or index is None:
        return None
    keys = [k for k in index if k.startswith(prefix)]
    if not keys or any(k in (memory or {}) for k in keys):
        return None
    return Path(folder)


def _write_offloaded(tensors: dict[str, torch.Tensor], folder: Path):
    """``tensors`` written as accelerate offload files in ``folder`` (content-addressed names), and the weights
    map that reads them back."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    prefix = f"eigenkv-folded-{digest.hexdigest()[:32]}."
    folder.mkdir(parents=True, exist_ok=True)
    index: dict = {}
    for name, tensor in tensors.items():
        key = prefix + name
        file = folder / f"{key}.dat"
        expected = tensor.numel() * tensor.element_size()
        if file.is_file() and file.stat().st_size == expected:  # the same contents, written before
            index[key] = {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
            }
        else:
            offload_weight(tensor, key, str(folder), index)
    return PrefixedDataset(OffloadedWeightsLoader(save_folder=str(folder), index=index), prefix)


def refuse_offloaded(model: nn.Module, what: str, fix: str = OFFLOAD_HINT) -> None:
    """Raise ``ValueError`` when ``model`` has offloaded weights, which ``what`` cannot handle."""
    if is_offloaded(model):
        raise ValueError(
            f"{what} needs every weight in memory, but this model has weights offloaded by accelerate (on the "
            f"meta device until a forward loads them); {fix}"
        )
