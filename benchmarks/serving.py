"""Serving through a real ``xinference-local`` against the loaded model called directly.

Every ratio compares two measurements taken in the same run on the same machine.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ovis2_xinf.checkpoint import tokens_per_crop
from ovis2_xinf.generation import plan_sampling
from ovis2_xinf.loader import load_model
from ovis2_xinf.local_server import local_server
from ovis2_xinf.media import MediaLimits
from ovis2_xinf.messages import build_conversation
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.prompt import encode


def image_url(seed: int, size=(640, 480)) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(seed: int) -> List[Dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                         {"type": "text", "text": f"Describe picture number {seed}."}]}]


def decode_rate(runs: Sequence[Tuple[int, float, float]]) -> Optional[float]:
    """Median tokens/s after the first chunk over runs of (tokens, first chunk time, last chunk
    time); None when no run's tokens came in more than one chunk.

    A fast model asked for a few tokens can stream them all in one chunk (Xinference sends what
    was generated since its last pull): such a run has no interval to time decoding over.
    """
    rates = [(tokens - 1) / (last - first) for tokens, first, last in runs if last > first]
    return float(np.median(rates)) if rates else None


def _generate_stream(model, inputs: Dict[str, Any], plan) -> Iterator[List[int]]:
    """Plain transformers ``generate`` (the baseline), its new tokens as they come."""
    import queue
    import threading

    from transformers.generation.streamers import BaseStreamer

    tokens: "queue.Queue" = queue.Queue()

    class Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                tokens.put(value.reshape(-1).tolist())
            self.prompt_seen = True

        def end(self):
            tokens.put(None)

    def run():
        with torch.inference_mode():
            model.generate(**inputs, **plan.generate_kwargs, streamer=Streamer())

    threading.Thread(target=run, daemon=True).start()
    while (batch := tokens.get()) is not None:
        yield batch


def direct(path: Path, max_tokens: int, runs: int = 3) -> Dict[str, float]:
    """Prefill time and decode rate of ``generate`` on the loaded model, same prompt as served."""
    loaded = load_model(path, torch.float32, "cpu")
    pre = Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor)
    conversation = build_conversation(messages(0), MediaLimits())
    images = pre.batch(conversation.images, conversation.max_partition)
    encoded = encode(loaded.tokenizer, conversation.turns, images, loaded.placeholders, tokens_per_crop(loaded.model.config))
    plan = plan_sampling({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}, {}, [], 0,
                         encoded.input_ids.shape[1], 32768)
    inputs = {"input_ids": encoded.input_ids, "pixel_values": encoded.pixel_values}
    ttfts, timings = [], []
    for _ in range(runs):
        start = time.perf_counter()
        first = last = None
        count = 0
        for batch in _generate_stream(loaded.model, inputs, plan):
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(batch)
        ttfts.append(first - start)
        timings.append((count, first, last))
    return {"ttft_s": float(np.median(ttfts)), "decode_tok_s": decode_rate(timings),
            "prompt_tokens": int(encoded.input_ids.shape[1])}


def _stream_once(client, uid: str, msgs, max_tokens: int) -> Dict[str, Any]:
    start = time.perf_counter()
    first = last = None
    text = ""
    usage = None
    stream = client.chat.completions.create(
        model=uid, messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    return {"start": start, "first": first, "last": last, "text": text, "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens}


def served(path: Path, max_tokens: int, runs: int = 3, torch_dtype: Optional[str] = "float32",
           extra_launch: Sequence[str] = ()) -> Dict[str, Any]:
    """TTFT and decode rate of one stream at a time (concurrency: :mod:`benchmarks.concurrency`);
    ``torch_dtype`` None: the model class's own choice for this machine. Every run sends the same
    image: with reuse on (the default) the TTFT after the warm-up is a reuse hit."""
    from openai import OpenAI

    result: Dict[str, Any] = {}
    with local_server() as server:
        start = time.perf_counter()
        uid = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "1",
                            "--model-format", "pytorch", "--model-path", str(path),
                            *(("--torch_dtype", torch_dtype) if torch_dtype else ()), *extra_launch)
        result["launch_to_ready_s"] = time.perf_counter() - start
        client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="none", max_retries=0, timeout=3600)
        _stream_once(client, uid, messages(0), 2)  # warm-up
        samples = [_stream_once(client, uid, messages(0), max_tokens) for _ in range(runs)]
        result["ttft_s"] = float(np.median([s["first"] - s["start"] for s in samples]))
        result["decode_tok_s"] = decode_rate([(s["tokens"], s["first"], s["last"]) for s in samples])
        result["prompt_tokens"] = samples[0]["prompt_tokens"]
    return result


LOAD = r'''
import sys, time, torch
from transformers import Ovis2ForConditionalGeneration  # imports are not load time, for either
from transformers import PreTrainedTokenizerFast  # noqa: F401
kind, path = sys.argv[1], sys.argv[2]
if kind == "native":
    start = time.perf_counter()
    model = Ovis2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
else:
    from ovis2_xinf.loader import load_model
    start = time.perf_counter()
    model = load_model(path, torch.float32, "cpu").model
sum(float(p.float().sum()) for p in model.parameters())  # touch every weight: lazy mmap pages count too
print("SECONDS", time.perf_counter() - start)
'''


def _timed_load(kind: str, path: Path) -> float:
    done = subprocess.run([sys.executable, "-c", LOAD, kind, str(path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(next(l for l in done.stdout.splitlines() if l.startswith("SECONDS")).split()[1])


def load_times(path: Path, native_dir: Path) -> Dict[str, float]:
    """Our loader on the original checkpoint against a plain ``from_pretrained`` of the same
    weights saved in native format, same stored dtype (bf16) and target dtype (float32),
    each in a fresh process, every weight touched once."""
    if not (native_dir / "config.json").exists():
        loaded = load_model(path, torch.bfloat16, "cpu")
        loaded.model.save_pretrained(native_dir)
        del loaded
    return {"ours_s": _timed_load("ours", path), "plain_from_pretrained_s": _timed_load("native", native_dir)}
