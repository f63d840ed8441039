"""Load an original-format Ovis2 checkpoint into ``Ovis2ForConditionalGeneration``.

Parameters are created on the meta device and filled tensor by tensor from the
safetensors shards, each converted to the target dtype and placed on its device as it
is read: peak memory stays close to the size of the weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set, Union

import torch
from torch import nn

from .attention import text_attention
from .checkpoint import (
    CheckpointError,
    OriginalCheckpoint,
    PlaceholderIds,
    convert_tensor,
    iter_original_tensors,
    native_config,
)

logger = logging.getLogger(__name__)

DeviceMap = Dict[str, Union[int, str, torch.device]]


@dataclass
class LoadedOvis2:
    model: Any  # Ovis2ForConditionalGeneration
    tokenizer: Any
    placeholders: PlaceholderIds
    checkpoint: OriginalCheckpoint
    dtype: torch.dtype
    device: torch.device


def load_tokenizer(path: Union[str, Path]):
    """The checkpoint's own ``tokenizer.json``, exactly as saved.

    Loaded through the generic fast-tokenizer class: no hub code is consulted, and unlike
    ``Qwen2Tokenizer`` in transformers 5 it keeps the file's pre-tokenizer instead of
    substituting Qwen's built-in one, which would change ids for some checkpoints.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({exc})") from None


def choose_attention(requested: Optional[str], device: torch.device) -> str:
    """flash-attn only where it can run; the checkpoints ask for it even on CPU."""
    if requested == "flash_attention_2":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        logger.info("flash_attention_2 requested but unavailable on %s; using sdpa", device)
        return "sdpa"
    if requested in (None, "", "auto"):
        return "sdpa"
    return requested


def build_empty_model(config) -> nn.Module:
    """The native model with parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights
    from transformers import Ovis2ForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = Ovis2ForConditionalGeneration(config)
    return model


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, device, dtype: Optional[torch.dtype]) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attr, None)
    if current is None:
        raise CheckpointError(f"no parameter {name!r} in the native model")
    if tuple(current.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{name}: checkpoint shape {tuple(value.shape)} does not match the config's {tuple(current.shape)}"
        )
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    value = value.to(device)
    if isinstance(current, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, attr, value)


def fill_weights(
    model: nn.Module,
    checkpoint: OriginalCheckpoint,
    dtype: Optional[torch.dtype],
    place: Callable[[str], Any],
    handles: Optional[Callable[[str], bool]] = None,
    special: Optional[Callable[[nn.Module, str, torch.Tensor], bool]] = None,
) -> Set[str]:
    """Stream every checkpoint tensor into ``model``; returns the native names filled.

    ``special`` lets the GPTQ path take tensors that are not plain parameters.
    """
    filled: Set[str] = set()
    for original, opened, shard in iter_original_tensors(checkpoint):
        tensor = opened.get_tensor(original)
        for name, value in convert_tensor(original, tensor):
            if special is not None and special(model, name, value):
                filled.add(name)
                continue
            try:
                _set_tensor(model, name, value, place(name), dtype)
            except CheckpointError as exc:
                raise CheckpointError(f"{shard}: {exc}") from None
            except AttributeError:
                raise CheckpointError(f"{shard}: tensor {original!r} has no place in the native model") from None
            filled.add(name)
    return filled


def finish_model(model: nn.Module, filled: Set[str], checkpoint: OriginalCheckpoint) -> None:
    """Tie, check completeness, and drop the vision norm the original never applied."""
    embed = "model.language_model.embed_tokens.weight"
    if "lm_head.weight" not in filled:
        if not model.config.tie_word_embeddings:
            raise CheckpointError(f"{checkpoint.path}: no lm_head weight and the config does not tie embeddings")
        model.lm_head.weight = model.get_submodule("model.language_model.embed_tokens").weight
        filled.add("lm_head.weight")
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{checkpoint.path}: {len(missing)} weights missing from the checkpoint: {shown}")
    del embed
    # The original takes vision features before AIMv2's final norm.
    model.model.vision_tower.transformer.rms_norm = nn.Identity()
    model.eval()


def plan_device_map(model: nn.Module, max_memory: Dict[Union[int, str], int], dtype: torch.dtype) -> DeviceMap:
    """Split the model over several devices, never inside a decoder or vision layer."""
    from accelerate import infer_auto_device_map

    no_split = ["Qwen2DecoderLayer", "Ovis2VisionEncoderLayer", "Ovis2VisionModel"]
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _placement(device_map: Optional[DeviceMap], device: torch.device) -> Callable[[str], Any]:
    if not device_map:
        return lambda name: device
    keys = sorted(device_map, key=len, reverse=True)

    def place(name: str):
        for key in keys:
            if key == "" or name == key or name.startswith(key + "."):
                target = device_map[key]
                return f"cuda:{target}" if isinstance(target, int) else target
        raise CheckpointError(f"device map has no place for {name}")

    return place


def load_model(
    path: Union[str, Path],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    attn_implementation: Optional[str] = None,
    max_memory: Optional[Dict[Union[int, str], int]] = None,
    quantization_loader: Optional[Any] = None,
) -> LoadedOvis2:
    """Load model and tokenizer from an original-format checkpoint directory.

    ``max_memory`` with more than one device shards the model with an accelerate
    device map; ``quantization_loader`` (see :mod:`ovis2_xinf.gptq`) prepares quantized
    linears before the weights stream in.
    """
    device = torch.device(device)
    if quantization_loader is not None:
        dtype = quantization_loader.compute_dtype(dtype)
    checkpoint = OriginalCheckpoint.open(path)
    tokenizer = load_tokenizer(checkpoint.path)
    attention = attn_implementation or choose_attention(checkpoint.requested_attention, device)
    if attention == "flash_attention_2" and attn_implementation:
        attention = choose_attention(attention, device)
    config = native_config(checkpoint, len(tokenizer), attention)
    config.text_config._attn_implementation = text_attention(attention, device)
    model = build_empty_model(config)
    special = None
    if quantization_loader is not None:
        special = quantization_loader.prepare(model, checkpoint, dtype)
    device_map = None
    if max_memory and len([k for k in max_memory if k != "cpu"]) > 1:
        device_map = plan_device_map(model, max_memory, dtype)
    filled = fill_weights(model, checkpoint, dtype, _placement(device_map, device), special=special)
    finish_model(model, filled, checkpoint)
    if device_map:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    else:
        model.to(device)
    if quantization_loader is not None:
        model = quantization_loader.finalize(model)
    placeholders = PlaceholderIds(config.image_token_id, tuple(config.visual_indicator_token_ids))
    return LoadedOvis2(model, tokenizer, placeholders, checkpoint, dtype, device)
