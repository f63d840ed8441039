"""The dtype a model computes in on the CPU: bfloat16 where this CPU computes it natively and
clearly faster than float32, else float32.

Flags alone cannot decide it. A CPU without native bf16 (no ``avx512_bf16``/``amx_bf16`` on x86,
no ``bf16`` on ARM) runs bf16 matmuls by converting to float32, slower than float32 itself: that
"no" is read from ``/proc/cpuinfo`` at once. A CPU with the flags is usually about twice as fast
in bf16, but not at every shape (a one-row product gains far less), and how much depends on the
cores, the memory and the torch build. So :func:`choose_cpu_dtype` times a short probe of the
model's own products in both dtypes, on random weights of their shapes:

* ``prefill_text``: ``PREFILL_ROWS`` rows through one language-model MLP (up then down projection);
* ``prefill_vision``: the same rows through one vision-encoder MLP;
* ``decode_1`` / ``decode_8``: 1 and 8 rows through a stack of language-model MLPs holding more
  weights than a last-level cache (``DECODE_BF16_BYTES`` in bf16, twice that in float32; or the
  model's layer count, if that holds less), since a decode step streams every weight from
  memory; 8 rows take the faster of the two kernels
  :mod:`ovis2_xinf.linear_kernels` chooses between, as the served model does.

Each product is timed float32 then bfloat16 (the order alternating), best of ``REPEATS`` after a
warm-up through one layer, where oneDNN builds its kernels. The ratio is float32 seconds over
bfloat16 seconds. bf16 is chosen when the geometric mean of the prefill and decode ratios is at
least ``MIN_SPEEDUP`` and neither phase is slower in bf16. The margin is there because bf16 is not
free: logits move by up to about 0.1 and near-tied greedy tokens can swap, so it has to buy a
clear speedup, well beyond the probe's run-to-run spread; a CPU that only emulates bf16 measures
under 1.

The probe runs on one thread (``PROBE_THREADS``), whatever the model computes with: the question
is what a core computes faster, and one thread's answer does not depend on what else runs at
load. With every thread, on a machine where another process holds a core, each OpenMP barrier
waits for that core (see ``BatchScheduler._fit_threads``): products take several times longer at
random, oneDNN's bf16 ones more than MKL's float32 ones, and the choice changed from one load to
the next. The weights are capped (``MAX_LAYER_ELEMENTS`` per MLP, the intermediate size cut to
fit) so that the probe stays short on one core for the largest models too.

``OVIS2_XINF_CPU_DTYPE`` (``auto``, ``bfloat16`` or ``float32``) overrides the choice, for tests,
for comparing, or to skip the probe. Quantized (GPTQ) checkpoints are left alone: their kernels
decide their compute dtype (see :meth:`ovis2_xinf.gptq.GPTQLoader.compute_dtype`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .linear_kernels import transposed_linear

logger = logging.getLogger(__name__)

ENV = "OVIS2_XINF_CPU_DTYPE"
CHOICES = ("auto", "bfloat16", "float32")
#: ``/proc/cpuinfo`` flags of native bf16 arithmetic: AVX512-BF16 and AMX on x86, FEAT_BF16 on ARM.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
MIN_SPEEDUP = 1.2
PREFILL_ROWS = 256
DECODE_ROWS = (1, 8)
REPEATS = 3
PROBE_THREADS = 1
MAX_LAYER_ELEMENTS = 10 << 20
DECODE_BF16_BYTES = 32 << 20

#: Per probe product: (float32 seconds, bfloat16 seconds).
Timings = Dict[str, Tuple[float, float]]


@dataclass(frozen=True)
class ProbeShapes:
    """The sizes of the products that dominate a model's prefill and decode on the CPU."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    vision_hidden: int
    vision_intermediate: int

    @classmethod
    def of(cls, config: Any) -> "ProbeShapes":
        """From the native ``Ovis2Config``, an :class:`~ovis2_xinf.checkpoint.OriginalCheckpoint`
        (known before any weight is loaded), or shapes already."""
        if isinstance(config, cls):
            return config
        text = getattr(config, "text_config", None)
        if text is not None:
            vision = config.vision_config
            return cls(text.hidden_size, text.intermediate_size, text.num_hidden_layers, vision.hidden_size,
                       vision.intermediate_size)
        llm = getattr(config, "llm_config", None)
        if isinstance(llm, dict):
            backbone = config.visual_config["backbone_config"]
            return cls(llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], backbone["hidden_size"],
                       backbone["intermediate_size"])
        raise TypeError(f"no Ovis2 text and vision sizes in {type(config).__name__}")

    @classmethod
    def for_size(cls, size_in_billions: int) -> "ProbeShapes":
        """The catalogue's dimensions of an Ovis2 size: no checkpoint needed (``doctor``)."""
        from .catalog import real_dimensions

        dims = real_dimensions(size_in_billions)
        return cls(dims.llm[0], dims.llm[1], dims.llm[2], dims.vision[0], dims.vision[1])


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class CpuDtypeChoice:
    """What :func:`choose_cpu_dtype` chose, and on what grounds."""

    dtype: torch.dtype
    source: str  # "override", "quantized", "flags" or "timed"
    reason: str
    flags: Optional[Tuple[str, ...]]  # native bf16 flags of this CPU; None where they cannot be read
    seconds: Timings = field(default_factory=dict)
    probe_seconds: float = 0.0

    @property
    def ratios(self) -> Dict[str, float]:
        """Float32 seconds over bfloat16 seconds, per probe product (above 1: bf16 is faster)."""
        return {name: fp32 / bf16 for name, (fp32, bf16) in self.seconds.items()}

    def _phase(self, prefix: str) -> Optional[float]:
        ratios = [r for name, r in self.ratios.items() if name.startswith(prefix)]
        return _geomean(ratios) if ratios else None

    @property
    def prefill_ratio(self) -> Optional[float]:
        return self._phase("prefill")

    @property
    def decode_ratio(self) -> Optional[float]:
        return self._phase("decode")

    @property
    def speedup(self) -> Optional[float]:
        """The geometric mean of the prefill and decode ratios; None when nothing was timed."""
        phases = [p for p in (self.prefill_ratio, self.decode_ratio) if p is not None]
        return _geomean(phases) if phases else None

    def describe(self) -> str:
        """One line for the load log and ``doctor``."""
        name = str(self.dtype).removeprefix("torch.")
        if self.source != "timed":
            return f"{name} ({self.reason})"
        return (f"{name} ({self.reason}: {self.speedup:.2f}x float32's speed, prefill {self.prefill_ratio:.2f}x, "
                f"decode {self.decode_ratio:.2f}x; probe {self.probe_seconds:.2f} s)")

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready, for ``doctor --json`` and the ``dtype`` benchmark."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "source": self.source,
            "reason": self.reason,
            "bf16_flags": None if self.flags is None else list(self.flags),
            "ratios": {name: round(r, 3) for name, r in self.ratios.items()},
            "speedup": None if self.speedup is None else round(self.speedup, 3),
            "probe_seconds": round(self.probe_seconds, 3),
            "describe": self.describe(),
        }


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[Tuple[str, ...]]:
    """This CPU's native-bf16 flags (x86 ``flags``, ARM ``Features``); None where they cannot be
    read (no ``/proc``: not Linux), which is not taken as a no."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in present)
    return None


def requested() -> str:
    """``OVIS2_XINF_CPU_DTYPE``, checked: ``auto`` when unset."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use one of {', '.join(CHOICES)}")
    return value


def decide(seconds: Timings) -> Tuple[bool, str]:
    """Whether timings like these make bf16 the choice, and why (see the module docstring)."""
    timed = CpuDtypeChoice(torch.float32, "timed", "", None, seconds)
    prefill, decode = timed.prefill_ratio, timed.decode_ratio
    if prefill is None or decode is None:
        raise ValueError(f"the probe timed no prefill or no decode product: {sorted(seconds)}")
    if timed.speedup < MIN_SPEEDUP:
        return False, f"not the {MIN_SPEEDUP:.2f}x faster it must be"
    if min(prefill, decode) < 1:
        return False, f"slower at {'prefill' if prefill < decode else 'decode'}"
    return True, "faster"


def choose_cpu_dtype(config: Any, model_format: str = "pytorch",
                     timer: Optional[Callable[[ProbeShapes], Timings]] = None) -> CpuDtypeChoice:
    """The dtype to load a model in on the CPU when none was asked for at launch: float32 for a
    quantized checkpoint, else ``OVIS2_XINF_CPU_DTYPE`` when set to a dtype, else
    :func:`auto_cpu_dtype`. ``config``: anything :meth:`ProbeShapes.of` reads."""
    wanted = requested()
    if model_format != "pytorch":
        return CpuDtypeChoice(torch.float32, "quantized",
                              f"{model_format} checkpoint: its loader picks the compute dtype", cpu_bf16_flags())
    if wanted != "auto":
        return CpuDtypeChoice(getattr(torch, wanted), "override", f"{ENV}={wanted}", cpu_bf16_flags())
    return auto_cpu_dtype(config, timer)


def auto_cpu_dtype(config: Any, timer: Optional[Callable[[ProbeShapes], Timings]] = None) -> CpuDtypeChoice:
    """float32 at once on a CPU whose flags say it lacks native bf16; else what the probe finds.

    ``timer`` (default :func:`time_probe`) gives each product's (float32, bfloat16) seconds.
    """
    flags = cpu_bf16_flags()
    if flags is not None and not flags:
        return CpuDtypeChoice(torch.float32, "flags",
                              f"auto: no native bf16 on this CPU (no {', '.join(NATIVE_BF16_FLAGS)} flag)", flags)
    shapes = ProbeShapes.of(config)
    start = time.perf_counter()
    seconds = (timer or time_probe)(shapes)
    probe = time.perf_counter() - start
    faster, why = decide(seconds)
    reason = f"auto on {', '.join(flags) if flags else 'a CPU whose flags cannot be read'}: bf16 {why}"
    logger.debug("CPU dtype probe on %s: %s", shapes, seconds)
    return CpuDtypeChoice(torch.bfloat16 if faster else torch.float32, "timed", reason, flags, seconds, probe)


# --- the probe --------------------------------------------------------------------------------


def _mlp(hidden: int, intermediate: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up and down projection weights (float32), the intermediate size cut to ``MAX_LAYER_ELEMENTS``."""
    fitting = max(256, MAX_LAYER_ELEMENTS // (2 * hidden) // 256 * 256)
    inner = min(intermediate, fitting)
    up = torch.empty(inner, hidden).uniform_(-0.03, 0.03, generator=generator)
    down = torch.empty(hidden, inner).uniform_(-0.03, 0.03, generator=generator)
    return up, down


@dataclass
class _Work:
    """One probe product in one dtype through one kernel."""

    x: torch.Tensor
    layers: List[Tuple[torch.Tensor, torch.Tensor]]
    kernel: Callable[..., torch.Tensor]

    def run(self, layers: Optional[int] = None) -> None:
        for up, down in self.layers[:layers]:
            self.kernel(self.kernel(self.x, up, None), down, None)

    def seconds(self) -> float:
        start = time.perf_counter()
        self.run()
        return time.perf_counter() - start


def _products(shapes: ProbeShapes) -> Dict[str, Tuple[List[_Work], List[_Work]]]:
    """Per product, its float32 and its bfloat16 works: one per kernel it may run with."""
    generator = torch.Generator().manual_seed(0)
    text = _mlp(shapes.text_hidden, shapes.text_intermediate, generator)
    vision = _mlp(shapes.vision_hidden, shapes.vision_intermediate, generator)
    bf16_layer_bytes = 2 * text[0].numel() * 2
    copies = max(1, min(shapes.text_layers, -(-DECODE_BF16_BYTES // bf16_layer_bytes)))
    stack = [text] + [(up.clone(), down.clone()) for up, down in [text] * (copies - 1)]
    cast: Dict[Tuple[int, torch.dtype], List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    products = {}
    for name, hidden, layers, rows in [("prefill_text", shapes.text_hidden, [text], PREFILL_ROWS),
                                       ("prefill_vision", shapes.vision_hidden, [vision], PREFILL_ROWS),
                                       *[(f"decode_{r}", shapes.text_hidden, stack, r) for r in DECODE_ROWS]]:
        x = torch.empty(rows, hidden).uniform_(-1, 1, generator=generator)
        # As served: prefills and single rows take F.linear, a few rows the faster of the two kernels.
        kernels = [F.linear] if rows in (1, PREFILL_ROWS) else [F.linear, transposed_linear]
        ways = []
        for dtype in (torch.float32, torch.bfloat16):
            key = (id(layers), dtype)
            if key not in cast:  # the two decode products share their weights
                cast[key] = [(up.to(dtype), down.to(dtype)) for up, down in layers]
            ways.append([_Work(x.to(dtype), cast[key], kernel) for kernel in kernels])
        products[name] = (ways[0], ways[1])
    return products


def time_probe(shapes: ProbeShapes, repeats: int = REPEATS) -> Timings:
    """Each probe product's best (float32, bfloat16) seconds over ``repeats`` interleaved runs,
    after a warm-up through one layer (where oneDNN builds its kernels); a product with two
    kernels counts the faster. On ``PROBE_THREADS`` threads: see the module docstring."""
    products = _products(shapes)
    threads = torch.get_num_threads()
    torch.set_num_threads(PROBE_THREADS)
    try:
        with torch.inference_mode():
            for fp32, bf16 in products.values():
                for work in (*fp32, *bf16):
                    work.run(layers=1)
            best = {name: [math.inf, math.inf] for name in products}
            for index in range(repeats):
                for name, ways in products.items():
                    for which in ((0, 1) if index % 2 == 0 else (1, 0)):
                        best[name][which] = min(best[name][which], *(work.seconds() for work in ways[which]))
    finally:
        torch.set_num_threads(threads)
    return {name: (fp32, bf16) for name, (fp32, bf16) in best.items()}
