"""Loaded sizes and peak memory while loading, each load in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, sys, time, torch
from benchmarks.memory import rss
from ovis2_xinf.loader import load_model
from ovis2_xinf.quantization import quantization_loader_for

path, fmt, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if fmt == "gptq":
    import gptqmodel  # noqa: F401  (import cost is not load cost)
baseline = rss("VmRSS:")
start = time.perf_counter()
loaded = load_model(path, dtype, "cpu", quantization_loader=quantization_loader_for(fmt, path, "cpu"))
seconds = time.perf_counter() - start
peak = rss("VmHWM:")

def size(module):
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

m = loaded.model
print("RESULT" + json.dumps({
    "load_seconds": seconds, "peak_rss_delta": peak - baseline, "dtype": str(loaded.dtype),
    "llm_decoder_bytes": size(m.model.language_model.layers),
    "llm_bytes": size(m.model.language_model) + (0 if m.config.tie_word_embeddings else size(m.lm_head)),
    "vision_bytes": size(m.model.vision_tower) + size(m.model.visual_embeddings_table),
    "total_bytes": size(m),
}))
'''


def rss(field: str) -> int:
    """This process's ``VmRSS:`` or ``VmHWM:`` (peak) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def in_fresh_process(args: Sequence[str], what: str) -> Dict[str, Any]:
    """Run ``python args`` from the repository root and return the JSON it printed after ``RESULT``:
    a load measured in a process of its own, so that nothing loaded before counts."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def measure_load(path: Path, model_format: str, dtype: str) -> Dict[str, Any]:
    result = in_fresh_process(["-c", PROBE, str(path), model_format, dtype], f"load of {path}")
    weights = result["total_bytes"]
    result["peak_over_loaded_bytes"] = result["peak_rss_delta"] / weights if weights else None
    return result


def compare(pytorch_path: Path, gptq_path: Path, label: str, dtype: str = "float16") -> Dict[str, Any]:
    """Quantized LLM against the pytorch format of the same model, same compute dtype."""
    dense = measure_load(pytorch_path, "pytorch", dtype)
    quantized = measure_load(gptq_path, "gptq", dtype)
    return {
        "model": label,
        "dtype": dtype,
        "pytorch": dense,
        "gptq": quantized,
        "llm_decoder_ratio": quantized["llm_decoder_bytes"] / dense["llm_decoder_bytes"],
        "llm_ratio": quantized["llm_bytes"] / dense["llm_bytes"],
        "total_ratio": quantized["total_bytes"] / dense["total_bytes"],
    }
