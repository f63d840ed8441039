"""GPTQ checkpoints of the original Ovis2 layout, on GPTQModel's kernels.

The Ovis team quantized only the LLM decoder linears (``qweight``, ``qzeros``,
``scales``, ``g_idx``); everything else stays floating point. transformers' and
optimum's GPTQ integration cannot find the block name in the original
``llm.model.layers`` layout, so the quantized linears are placed here directly, with
GPTQModel's public ``hf_*`` helpers choosing the kernel and converting the v1
checkpoint format.

Two modes:

* ``kernel`` (what is served): GPTQModel's best kernel for the device, half precision;
* ``dequantize``: every quantized linear becomes a plain linear holding
  ``scales[g_idx] * (q - (qzeros + 1))``, exact in float32. Used to check the mapping
  against the references, and useful for debugging a checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, OriginalCheckpoint

logger = logging.getLogger(__name__)

QUANTIZED = re.compile(
    r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"
)
PARTS = ("qweight", "qzeros", "scales", "g_idx")
MODES = ("kernel", "dequantize")


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str
    meta: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: OriginalCheckpoint) -> "GPTQSettings":
        config = checkpoint.quantization_config
        where = checkpoint.path / "config.json"
        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: no quantization_config block; is this a GPTQ checkpoint?")
        method = config.get("quant_method", config.get("method"))
        if method != "gptq":
            raise CheckpointError(f"{where}: quantization_config.quant_method is {method!r}, expected 'gptq'")
        bits = config.get("bits")
        if bits not in (2, 3, 4, 8):
            raise CheckpointError(f"{where}: quantization_config.bits {bits!r} is not supported (2, 3, 4 or 8)")
        fmt = config.get("checkpoint_format", config.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not gptq")
        return cls(
            bits=int(bits),
            group_size=int(config.get("group_size", -1)),
            sym=bool(config.get("sym", True)),
            desc_act=bool(config.get("desc_act", False)),
            checkpoint_format=fmt,
            meta=dict(config.get("meta") or {}),
        )


def _unpack(packed: torch.Tensor, bits: int, along_rows: bool) -> torch.Tensor:
    """Unpack int32 words holding 32/bits values each, low bits first."""
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    if along_rows:  # qweight: (in / per_word, out) -> (in, out)
        values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return values.reshape(-1, packed.shape[1])
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # qzeros: (groups, out / per_word)
    return values.reshape(packed.shape[0], -1)


def dequantize(parts: Dict[str, torch.Tensor], settings: GPTQSettings) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of one GPTQ v1 linear."""
    if 32 % settings.bits:
        raise CheckpointError(f"{settings.bits}-bit packing is not supported by the dequantizing loader")
    q = _unpack(parts["qweight"], settings.bits, along_rows=True).to(torch.float32)
    zeros = _unpack(parts["qzeros"], settings.bits, along_rows=False).to(torch.float32)
    if settings.checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores zero points minus one
    g_idx = parts["g_idx"].long()
    scales = parts["scales"].to(torch.float32)
    weight = scales[g_idx] * (q - zeros[g_idx])
    return weight.t().contiguous()


class GPTQLoader:
    """Plugs GPTQ tensors into :func:`ovis2_xinf.loader.load_model`."""

    def __init__(self, settings: GPTQSettings, device: Union[str, torch.device], mode: str = "kernel"):
        if mode not in MODES:
            raise ValueError(f"gptq mode {mode!r}: use one of {MODES}")
        self.settings = settings
        self.device = torch.device(device)
        self.mode = mode
        self.kernel: Optional[type] = None
        self._pending: Dict[str, Dict[str, torch.Tensor]] = {}

    @classmethod
    def for_checkpoint(cls, path: Union[str, Path], device: Union[str, torch.device], mode: str = "kernel") -> "GPTQLoader":
        return cls(GPTQSettings.from_checkpoint(OriginalCheckpoint.open(path)), device, mode)

    def compute_dtype(self, requested: torch.dtype) -> torch.dtype:
        """GPTQModel's kernels compute in half precision only."""
        if self.mode == "dequantize":
            return requested
        return requested if requested in (torch.float16, torch.bfloat16) else torch.float16

    def _select_kernel(self) -> type:
        from gptqmodel.utils.importer import hf_select_quant_linear

        s = self.settings
        device_map = {"": self.device.type if self.device.type != "cuda" else (self.device.index or 0)}
        return hf_select_quant_linear(
            bits=s.bits, group_size=s.group_size, desc_act=s.desc_act, sym=s.sym,
            checkpoint_format=s.checkpoint_format, meta=s.meta, pack=False, device_map=device_map, backend="auto",
        )

    def prepare(self, model: nn.Module, checkpoint: OriginalCheckpoint, dtype: torch.dtype) -> Callable[[nn.Module, str, torch.Tensor], bool]:
        """Swap the decoder linears before loading; returns the tensor router."""
        targets = [name for name, module in model.named_modules() if QUANTIZED.match(name) and isinstance(module, nn.Linear)]
        if not targets:
            raise CheckpointError(f"{checkpoint.path}: no decoder linears found to quantize")
        if self.mode == "kernel":
            self.kernel = self._select_kernel()
            logger.info("GPTQ kernel for %s: %s", self.device, self.kernel.__name__)
            s = self.settings
            for name in targets:
                linear = model.get_submodule(name)
                parent, _, child = name.rpartition(".")
                quantized = self.kernel(
                    bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=s.desc_act,
                    in_features=linear.in_features, out_features=linear.out_features,
                    bias=linear.bias is not None, pack_dtype=torch.int32, register_buffers=True,
                )
                setattr(model.get_submodule(parent), child, quantized)
        quantized_names = set(targets)

        def route(model: nn.Module, name: str, value: torch.Tensor) -> bool:
            module_name, _, leaf = name.rpartition(".")
            if module_name not in quantized_names:
                return False
            if leaf == "weight":
                raise CheckpointError(f"{checkpoint.path}: {name} is stored unquantized in a GPTQ checkpoint")
            if self.mode == "kernel":
                module = model.get_submodule(module_name)
                if leaf == "bias":
                    value = value.to(dtype)
                current = getattr(module, leaf)
                if tuple(current.shape) != tuple(value.shape):
                    raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != expected {tuple(current.shape)}")
                setattr(module, leaf, value.to(self.device))
                return True
            if leaf == "bias":
                return False  # a plain linear bias, loaded the ordinary way
            parts = self._pending.setdefault(module_name, {})
            parts[leaf] = value
            if all(p in parts for p in PARTS):
                weight = dequantize(self._pending.pop(module_name), self.settings)
                linear = model.get_submodule(module_name)
                if tuple(weight.shape) != tuple(linear.weight.shape):
                    raise CheckpointError(f"{module_name}: dequantized shape {tuple(weight.shape)} != {tuple(linear.weight.shape)}")
                linear.weight = nn.Parameter(weight.to(self.device, dtype), requires_grad=False)
            return True

        return route

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.mode == "dequantize":
            if self._pending:
                missing = {n: sorted(set(PARTS) - set(p)) for n, p in self._pending.items()}
                raise CheckpointError(f"incomplete GPTQ tensors: {missing}")
            return model
        from gptqmodel.utils.model import hf_convert_gptq_v1_to_v2_format, hf_gptqmodel_post_init

        s = self.settings
        model, _ = hf_convert_gptq_v1_to_v2_format(model, s.bits, self.kernel, s.checkpoint_format, s.meta)
        return hf_gptqmodel_post_init(model, use_act_order=s.desc_act)
