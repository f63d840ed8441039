"""Hostile load: does a plain text request still answer while others ask for the most work allowed?

Eight clients each send the heaviest request the limits let through (``--concurrent``): as many
images as a request may hold, each as large as the pixel limits allow, at the highest
``max_partition``, with a long answer. While they are being served, a plain text request is sent
every quarter of a second until they are done; its worst latency is compared with the same request's latency on an idle server, in the
same run. Target: loaded <= 2 x alone + 1 s.
"""

from __future__ import annotations

import base64
import io
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import httpx
from PIL import Image

from ovis2_xinf.local_server import local_server
from ovis2_xinf.media import MediaLimits
from ovis2_xinf.preprocessing import DEFAULT_MAX_PARTITION_LIMIT

SPACING_S = 0.25
MAX_SAMPLES = 200
PLAIN = {"messages": [{"role": "user", "content": "hello, who are you?"}], "max_tokens": 16, "temperature": 0}


def png_url(side: int) -> str:
    """A ``side`` x ``side`` PNG: a gradient, so it compresses to little and still decodes every row."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def heaviest_request(limits: MediaLimits, max_partition: int, max_tokens: int, scale: float = 1.0) -> Dict[str, Any]:
    """The most work one request may ask for: images at the per-image and per-request pixel limits."""
    images = limits.max_images
    per_image = min(limits.max_image_pixels, getattr(limits, "max_request_pixels", math.inf) // images)
    side = max(1, int(math.isqrt(int(per_image * scale))))
    url = png_url(side)
    content = [{"type": "image_url", "image_url": {"url": url}} for _ in range(images)]
    content.append({"type": "text", "text": "Describe every picture in detail."})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "mm_processor_kwargs": {"max_partition": max_partition},
            "_shape": {"images": images, "side": side}}


def _timed(client: httpx.Client, uid: str, body: Dict[str, Any]) -> float:
    started = time.monotonic()
    reply = client.post("/chat/completions", json={"model": uid, **body})
    reply.raise_for_status()
    return time.monotonic() - started


def run(model_path: Path, concurrent: int = 8, repeats: int = 3, scale: float = 1.0,
        max_tokens: int = 256) -> Dict[str, Any]:
    limits = MediaLimits.from_env()
    heavy = heaviest_request(limits, DEFAULT_MAX_PARTITION_LIMIT, max_tokens, scale)
    shape = heavy.pop("_shape")
    with local_server() as server:
        uid = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                            "--model-format", "pytorch", "--model-path", str(model_path))
        with httpx.Client(base_url=f"{server.endpoint}/v1", timeout=1800) as client:
            _timed(client, uid, PLAIN)  # warm
            alone = [_timed(client, uid, PLAIN) for _ in range(repeats)]
            heavy_times: List[float] = []
            errors: List[str] = []

            def hostile() -> None:
                try:
                    heavy_times.append(_timed(client, uid, heavy))
                except httpx.HTTPError as error:
                    errors.append(str(error)[:200])

            threads = [threading.Thread(target=hostile) for _ in range(concurrent)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(0.3)  # the heavy requests are being fetched, decoded and resized by now
            loaded = []  # sent every SPACING_S while the heavy requests last, at least once
            while not loaded or (any(t.is_alive() for t in threads) and len(loaded) < MAX_SAMPLES):
                loaded.append(_timed(client, uid, PLAIN))
                time.sleep(SPACING_S)
            for thread in threads:
                thread.join()
            wall = time.monotonic() - started
    alone_s = statistics.median(alone)
    worst = max(loaded) if loaded else None
    bound = 2 * alone_s + 1.0
    return {
        "concurrent": concurrent, "heavy_request": {**shape, "max_partition": DEFAULT_MAX_PARTITION_LIMIT,
                                                    "max_tokens": max_tokens, "pixels_each": shape["side"] ** 2},
        "alone_s": alone, "loaded_s": loaded, "heavy_s": sorted(heavy_times), "heavy_errors": errors,
        "heavy_wall_s": wall, "bound_s": bound,
        "verdict": {"loaded_worst_s": worst, "bound_s": bound,
                    "met": worst is not None and worst <= bound and not errors},
    }
