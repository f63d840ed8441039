"""float32 against bfloat16 on the CPU: the same checkpoint in both dtypes, in one run.

Direct: the model loaded in this process in both dtypes, plain forwards (no server, no
scheduler, no per-row-count linear kernels), the two dtypes measured in turn at each repeat (the
one going first alternating), so that both see the same machine:

* image TTFT: one image of random pixels (640x480 at ``max_partition`` 1; 1920x1080 at 9) with a
  short question: preprocessing, encoding and the prefill into a ``DynamicCache`` up to the first
  token on the host; the image is decoded once beforehand (that costs the same in both dtypes).
  Best of the repeats;
* decode: tokens/s of batched decode steps at 1, 8 and 16 rows, as the ``scheduler`` section's
  direct baseline measures them (:meth:`benchmarks.concurrency.Direct.decode`: the chat prompt
  prefilled once, its cache repeated to N rows, greedy steps timed after an untimed one). Best of
  the repeats;
* load and memory, each dtype in a fresh process: ``load_model``'s seconds; resident memory
  (VmRSS over what the interpreter held before loading, with every weight read once, so pages
  mapped but not yet read count too) after loading and after one prefill of the small image
  case; the peak (VmHWM) over the same baseline.

Also: the CPU's native-bf16 flags, and what ``auto`` chose for this checkpoint
(:func:`ovis2_xinf.cpu_dtype.auto_cpu_dtype`, whatever ``OVIS2_XINF_CPU_DTYPE`` says) and how long
its probe took.

Verdict. On a CPU with native bf16 flags: ``auto`` picks bfloat16; bf16 image TTFT at least
1.8x faster in both image cases; decode at least 1.5x faster at 1 row and 2.2x at 8; resident
memory after the prefill at most 0.55x float32's. On a CPU without: ``auto`` picks float32 (the
speed targets are not judged there).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ovis2_xinf.checkpoint import OriginalCheckpoint, tokens_per_crop
from ovis2_xinf.cpu_dtype import auto_cpu_dtype, cpu_bf16_flags
from ovis2_xinf.loader import LoadedOvis2, load_model
from ovis2_xinf.media import MediaLimits
from ovis2_xinf.messages import Conversation, build_conversation
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import encode

from .concurrency import Direct, Workload, chat_messages
from .memory import in_fresh_process, rss
from .serving import image_url

DTYPES = (torch.float32, torch.bfloat16)
IMAGES = (((640, 480), 1), ((1920, 1080), 9))
DECODE_ROWS = (1, 8, 16)
TARGETS = {"image_ttft_speedup": 1.8, "decode_1_speedup": 1.5, "decode_8_speedup": 2.2, "resident_ratio": 0.55}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def image_conversation(size: Tuple[int, int], max_partition: int, seed: int = 0) -> Conversation:
    """One image and a question, decoded: what a request holds before preprocessing."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed, size)}},
                                             {"type": "text", "text": "Describe the picture."}]}]
    return build_conversation(messages, MediaLimits(), max_partition)


def image_ttft(loaded: LoadedOvis2, pre: Ovis2ImagePreprocessor, conversation: Conversation) -> Tuple[float, int]:
    """Seconds from the decoded image to the first token on the host, and the prompt's tokens."""
    from transformers import DynamicCache

    start = time.perf_counter()
    images = pre.batch(conversation.images, conversation.max_partition)
    encoded = encode(loaded.tokenizer, conversation.turns, images, loaded.placeholders,
                     tokens_per_crop(loaded.model.config))
    with torch.inference_mode():
        out = loaded.model(input_ids=encoded.input_ids, attention_mask=torch.ones_like(encoded.input_ids),
                           pixel_values=encoded.pixel_values.to(loaded.dtype), past_key_values=DynamicCache(),
                           use_cache=True, logits_to_keep=1)
        out.logits[0, -1].argmax().item()
    return time.perf_counter() - start, int(encoded.input_ids.shape[1])


class DirectIn(Direct):
    """:class:`benchmarks.concurrency.Direct` on the CPU in ``dtype`` (Direct loads the dtype its
    own sections compare)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.device = torch.device("cpu")
        self.loaded = load_model(path, dtype, "cpu")
        self.pre = Ovis2ImagePreprocessor(self.loaded.checkpoint.preprocessor)
        self._prefilled: Dict[str, Any] = {}


def _orders(repeats: int) -> List[Tuple[torch.dtype, ...]]:
    return [DTYPES if index % 2 == 0 else DTYPES[::-1] for index in range(repeats)]


def measure_images(models: Dict[torch.dtype, DirectIn], repeats: int) -> List[Dict[str, Any]]:
    rows = []
    for (width, height), max_partition in IMAGES:
        conversation = image_conversation((width, height), max_partition)
        for direct in models.values():  # untimed: first-call costs of this prompt's shapes
            image_ttft(direct.loaded, direct.pre, conversation)
        best = {dtype: float("inf") for dtype in DTYPES}
        for order in _orders(repeats):
            for dtype in order:
                seconds, tokens = image_ttft(models[dtype].loaded, models[dtype].pre, conversation)
                best[dtype] = min(best[dtype], seconds)
        rows.append({"image": f"{width}x{height}", "max_partition": max_partition, "prompt_tokens": tokens,
                     "float32_s": best[torch.float32], "bfloat16_s": best[torch.bfloat16],
                     "speedup": best[torch.float32] / best[torch.bfloat16]})
    return rows


def measure_decode(models: Dict[torch.dtype, DirectIn], steps: int, repeats: int) -> List[Dict[str, Any]]:
    work = Workload("chat", chat_messages, steps + 1)
    rows = []
    for batch in DECODE_ROWS:
        best = {dtype: 0.0 for dtype in DTYPES}
        for order in _orders(repeats):
            for dtype in order:
                best[dtype] = max(best[dtype], models[dtype].decode(work, batch)["direct_tok_s"])
        rows.append({"rows": batch, "float32_tok_s": best[torch.float32], "bfloat16_tok_s": best[torch.bfloat16],
                     "speedup": best[torch.bfloat16] / best[torch.float32]})
    return rows


def load_here(path: str, dtype_name: str) -> Dict[str, Any]:
    """Load, read every weight once, prefill the small image case; memory over the baseline.
    Run in a fresh process (:func:`measure_load`)."""
    from transformers import Ovis2ForConditionalGeneration, PreTrainedTokenizerFast  # noqa: F401  (not load time)

    conversation = image_conversation(*IMAGES[0])
    baseline = rss("VmRSS:")
    start = time.perf_counter()
    loaded = load_model(path, getattr(torch, dtype_name), "cpu")
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        for parameter in loaded.model.parameters():
            parameter.sum()
    after_load = rss("VmRSS:") - baseline
    image_ttft(loaded, Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor), conversation)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return {"load_s": seconds, "weights_bytes": weights, "resident_after_load_bytes": after_load,
            "resident_after_prefill_bytes": rss("VmRSS:") - baseline, "peak_bytes": rss("VmHWM:") - baseline}


def measure_load(path: Path, dtype: torch.dtype) -> Dict[str, Any]:
    call = f"load_here({str(path)!r}, {_name(dtype)!r})"
    code = f"import json; from benchmarks.dtype import load_here; print('RESULT' + json.dumps({call}))"
    return in_fresh_process(["-c", code], f"loading {path} in {_name(dtype)}")


def _ratio(part: float, whole: float) -> Optional[float]:
    return part / whole if whole > 0 else None


def verdict(result: Dict[str, Any]) -> Dict[str, Any]:
    auto = result["cpu"]["auto"]["dtype"]
    if not result["cpu"]["bf16_flags"]:
        return {"native_bf16": False, "auto_picks_float32": auto == "float32", "met": auto == "float32"}
    image = min(row["speedup"] for row in result["image_ttft"])
    decode = {row["rows"]: row["speedup"] for row in result["decode"]}
    resident = result["load"]["resident_ratio"]
    checks = {
        "auto_picks_bfloat16": auto == "bfloat16",
        "image_ttft_met": image >= TARGETS["image_ttft_speedup"],
        "decode_1_met": decode[1] >= TARGETS["decode_1_speedup"],
        "decode_8_met": decode[8] >= TARGETS["decode_8_speedup"],
        "resident_met": resident is not None and resident <= TARGETS["resident_ratio"],
    }
    return {"native_bf16": True, "targets": TARGETS, "image_ttft_speedup_min": image,
            "decode_1_speedup": decode[1], "decode_8_speedup": decode[8], "resident_ratio": resident,
            **checks, "met": all(checks.values())}


def run_direct(model_path: Path, smoke: bool) -> Dict[str, Any]:
    """The whole direct comparison (see the module docstring); ``smoke``: fewest repetitions."""
    model_path = Path(model_path)
    repeats, steps = (1, 2) if smoke else (3, 32)
    auto = auto_cpu_dtype(OriginalCheckpoint.open(model_path))
    load = {_name(dtype): measure_load(model_path, dtype) for dtype in DTYPES}
    load["resident_ratio"] = _ratio(load["bfloat16"]["resident_after_prefill_bytes"],
                                    load["float32"]["resident_after_prefill_bytes"])
    load["load_speedup"] = load["float32"]["load_s"] / load["bfloat16"]["load_s"]
    models = {dtype: DirectIn(model_path, dtype) for dtype in DTYPES}
    result: Dict[str, Any] = {
        "cpu": {"bf16_flags": cpu_bf16_flags(), "threads": torch.get_num_threads(), "auto": auto.as_dict()},
        "repeats": repeats, "decode_steps": steps,
        "load": load,
        "image_ttft": measure_images(models, repeats),
        "decode": measure_decode(models, steps, repeats),
    }
    result["verdict"] = verdict(result)
    return result
