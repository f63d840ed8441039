"""On CPU, each language-model ``Linear`` computes its product the faster of two equal ways, by
row count, as measured the first time that count comes.

``x @ W.T`` (``F.linear``) and ``(W @ x.T).T`` are the same product, and MKL runs a different
kernel for each. For a decode step's few rows the second can be much faster: on this project's
2-core Xeon the 151,936-wide head at 8 rows takes about 63 ms one way and 44 ms the other, and
with the choice made per module the 1B decode step runs 1.13x faster at 8 rows and 1.33x at 16
(``python -m benchmarks scheduler --model 1b``, "linear kernels"). Which way wins depends on the
CPU, the shape and the row count, so it is timed, not assumed: the first call with a given row count times both
(best of ``REPEATS``) and keeps the faster for that module and count. The two differ by float
rounding only (about 1e-6 relative). A call with one row or more than ``max_rows`` (a prefill's
prompt), and every call off the CPU, goes to ``F.linear``.

A bfloat16 model (what :mod:`ovis2_xinf.cpu_dtype` picks on a CPU with native bf16) chooses the
same way, in bf16, where the two ways differ by bf16's rounding. It keeps no float32 copy of any
weight to compute a product in float32 where bf16 would be slower: the candidate was the head at
one row, the widest product of a one-row decode step and of every prefill's last position, and on
an AVX512-BF16 EPYC it measured faster in bf16 than in float32 (the ``dtype`` benchmark,
:mod:`benchmarks.dtype`, compares whole decode steps), while its float32 copy would cost 4 bytes
per weight beyond the 2 the model holds (545 MB for Ovis2-1B's 151,936 x 896 head), undoing most
of what bf16 saves in memory.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

REPEATS = 3


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Any) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T``."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _best_of(work, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


class _Chooser:
    """Per module: for each row count seen, whether the transposed product is the faster."""

    def __init__(self, module: torch.nn.Linear, max_rows: int):
        self.module = module
        self.max_rows = max_rows
        self.transposed: Dict[int, bool] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or not 1 < rows <= self.max_rows:
            return F.linear(x, weight, bias)
        choice = self.transposed.get(rows)
        if choice is None:
            plain = _best_of(lambda: F.linear(x, weight, bias), REPEATS)
            turned = _best_of(lambda: transposed_linear(x, weight, bias), REPEATS)
            choice = self.transposed[rows] = turned < plain
        return transposed_linear(x, weight, bias) if choice else F.linear(x, weight, bias)


def choose_linear_kernels(model: Any, max_rows: int) -> List[_Chooser]:
    """Let every plain ``nn.Linear`` of the language model and its head choose its kernel per
    row count up to ``max_rows`` (the most rows a decode step has). Quantized linears are not
    ``nn.Linear`` and keep theirs; so do linears under an accelerate device map."""
    language = model.get_decoder() if hasattr(model, "get_decoder") else model
    modules = [m for m in language.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        modules.append(head)
    choosers = []
    for module in modules:
        if getattr(module, "_hf_hook", None) is not None:  # accelerate placed it: its forward is accelerate's
            continue
        chooser = _Chooser(module, max_rows)
        module.forward = chooser
        choosers.append(chooser)
    return choosers
