"""Saving and loading cut-out models: safetensors weights and JSON configs, no pickle.

A model returned by :func:`~nodeprune_kernels.materialize` may have different sizes in every layer, which a
Hugging Face config cannot express, so ``save_pretrained`` / ``from_pretrained`` cannot always carry it.
:func:`save_pruned` writes a directory that records the circuit next to the weights; :func:`load_pruned`
rebuilds the full-size architecture on the meta device (nothing allocated), cuts the same circuit out of it
(the same code path as ``materialize``, so every family's per-layer attributes come out the same) and then
loads the saved tensors into it. The directory holds:

- ``config.json``: the model's config as ``save_pretrained`` writes it, including
  ``nodeprune_circuit`` (the circuit), ``nodeprune_layers`` (per-layer head counts and hidden units) and
  ``nodeprune_base_sizes`` (the original model's values of the config sizes that materialize changed);
- ``model.safetensors``: the parameters and persistent buffers under their Hugging Face names, shared
  (tied) tensors once;
- ``nodeprune_buffers.safetensors``: the non-persistent buffers (rotary frequencies, ...), so the reloaded
  model computes with exactly the saved values;
- ``generation_config.json`` when the model has one;
- ``nodeprune.json``: the file format, the model class, the attention implementation, the tied names and
  ``hf_compatible`` (whether ``AutoModelForCausalLM.from_pretrained(directory)`` can load the directory too:
  true when the config describes every layer's shapes).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .circuit import Circuit
from .materialize import hf_layout_mismatches, materialize
from .patch import is_patched

SAVED_FORMAT = 1
META_FILE = "nodeprune.json"
WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "nodeprune_buffers.safetensors"


def save_pruned(model: nn.Module, directory: "str | os.PathLike") -> Path:
    """Save a model made by :func:`~nodeprune_kernels.materialize` to ``directory`` (created if needed).

    Args:
        model: the materialized causal LM (any dtype and device); it is not changed.
        directory: where to write (the files are listed in this module's docstring; existing files of the
            same names are replaced).

    Returns:
        The directory, as a Path. ``json.loads((directory / "nodeprune.json").read_text())["hf_compatible"]``
        says whether ``from_pretrained`` can load it as well.

    Raises:
        TypeError: ``model`` is not a module with a Hugging Face config.
        ValueError: ``model`` is patched for pruning, or was not made by ``materialize`` (save an unmodified
            model with its own ``save_pretrained``).
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "to_json_string"):
        raise TypeError(f"save_pruned needs a Hugging Face causal LM, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("save_pruned saves the model that materialize(model, circuit) returns, not a model patched "
                         "for pruning; call materialize first (or remove_node_pruning and save_pretrained)")
    if not hasattr(config, "nodeprune_circuit"):
        raise ValueError("this model was not made by nodeprune_kernels.materialize (its config has no "
                         "nodeprune_circuit); save an unmodified model with model.save_pretrained(directory)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors, aliases = _unique_state(model)
    persistent = set(model.state_dict())
    buffers = {n: b.detach().contiguous() for n, b in model.named_buffers() if n not in persistent}
    config.save_pretrained(directory)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    save_file(buffers, directory / BUFFERS_FILE, metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    meta = {"format": SAVED_FORMAT, "class": type(model).__name__,
            "attn_implementation": getattr(config, "_attn_implementation", None), "tied": aliases,
            "hf_compatible": not hf_layout_mismatches(model)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def load_pruned(directory: "str | os.PathLike", *, device: "str | torch.device" = "cpu",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned`.

    Args:
        directory: the directory :func:`save_pruned` wrote.
        device: where the weights go (default "cpu").
        dtype: cast floating-point weights and buffers to this dtype (default: as saved).

    Returns:
        The causal LM, in eval mode, with the saved weights and buffers: its logits and ``generate()`` equal
        the saved model's. ``model.config.nodeprune_circuit`` holds the circuit, as after ``materialize``.

    Raises:
        FileNotFoundError: a file of the directory is missing.
        ValueError: a file is malformed, of another format version, or does not match the recorded circuit.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    cls = getattr(transformers, meta["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{directory / META_FILE}: class {meta['class']!r} is not a model class of this "
                         f"transformers ({transformers.__version__})")
    config = transformers.AutoConfig.from_pretrained(directory)
    for key in ("nodeprune_circuit", "nodeprune_base_sizes"):
        if not hasattr(config, key):
            raise ValueError(f"{directory / 'config.json'} has no {key}: it was not written by save_pruned")
    circuit = Circuit.from_dict(config.nodeprune_circuit, source=str(directory / "config.json"))

    base = copy.deepcopy(config)
    for name, value in config.nodeprune_base_sizes.items():
        setattr(base, name, value)
    for key in ("nodeprune_circuit", "nodeprune_layers", "nodeprune_base_sizes"):
        delattr(base, key)
    if meta["attn_implementation"] is not None:
        base._attn_implementation = meta["attn_implementation"]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = materialize(cls(base), circuit, verbose=False)
    if model.config.nodeprune_layers != config.nodeprune_layers:
        raise ValueError(f"{directory / 'config.json'}: nodeprune_layers {config.nodeprune_layers} do not match "
                         f"the sizes its circuit gives ({model.config.nodeprune_layers})")

    state = _read_tensors(directory / WEIGHTS_FILE, device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(meta["tied"]))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the model its config describes: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{directory / WEIGHTS_FILE}: shapes differ from the recorded circuit's: {wrong[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    for alias, target in meta["tied"].items():
        _set_tensor(model, alias, _get_tensor(model, target))
    for name, value in _read_tensors(directory / BUFFERS_FILE, device).items():
        _set_tensor(model, name, value)
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{directory}: no saved values for {left[:5]}; the directory was not written by "
                         "save_pruned for this model class")

    generation_file = directory / "generation_config.json"
    if generation_file.exists() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------ helpers
def _unique_state(model: nn.Module) -> tuple:
    """(the state dict with every shared tensor once, {dropped name: the name kept for it})."""
    tensors, seen, aliases = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} was not written by nodeprune_kernels."
                                "save_pruned (a directory of save_pretrained loads with from_pretrained)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SAVED_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: format {found!r} is not {SAVED_FORMAT}, the one this nodeprune_kernels "
                         "reads")
    for key, kind in (("class", str), ("tied", dict), ("hf_compatible", bool)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return meta


def _read_tensors(path: Path, device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: save the model again with save_pruned")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def _owner(model: nn.Module, name: str) -> tuple:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _owner(model, name)
    return getattr(module, attr)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``name``: a Parameter as that parameter, a buffer into the module's buffers."""
    module, attr = _owner(model, name)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise ValueError(f"the model has no parameter or buffer {name!r}")
