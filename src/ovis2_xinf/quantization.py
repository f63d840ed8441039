"""Choosing how quantized (GPTQ) checkpoints are loaded.

The pytorch format needs nothing. GPTQ checkpoints need GPTQModel's kernels, which
come with the ``[gptq]`` extra; without them a launch fails at once, naming what to
install, instead of deep inside the loader.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

GPTQ_INSTALL_HINT = "pip install 'ovis2-xinf[gptq]'"


class MissingQuantizationBackend(ImportError):
    """The checkpoint's format needs a package that is not installed."""


def gptq_backend_available() -> bool:
    return importlib.util.find_spec("gptqmodel") is not None


def quantization_loader_for(model_format: str, path: Any, device: str, gptq_mode: str = "kernel") -> Optional[Any]:
    """The loader a format needs; ``gptq_mode="dequantize"`` loads GPTQ as float weights."""
    if model_format == "pytorch":
        return None
    if model_format == "gptq":
        if gptq_mode == "kernel" and not gptq_backend_available():
            raise MissingQuantizationBackend(
                f"Ovis2 GPTQ checkpoints need GPTQModel, which is not installed: run {GPTQ_INSTALL_HINT}"
            )
        from .gptq import GPTQLoader

        return GPTQLoader.for_checkpoint(path, device, gptq_mode)
    raise ValueError(f"model_format {model_format!r} is not served by ovis2-xinf (pytorch, gptq)")
