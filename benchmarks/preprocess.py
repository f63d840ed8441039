"""Image preprocessing cost: ms per image on one CPU core, 448 px crops.

The baseline is this project's previous implementation: every crop cut out and resized by
Pillow (as the original implementation does), normalized through a lookup table; both run interleaved in one
process on the same images, and their outputs must be identical.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from PIL import Image

from ovis2_xinf.media import MediaLimits
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.resample import hold_whole_images

# Typical photos, and a phone screenshot: its whole-image resize runs the vertical pass first.
SIZES = [(640, 480), (1920, 1080), (4000, 3000), (1080, 2400)]
PARTITIONS = [1, 4, 9]
# Requests with several images, at the crop counts a request gets by default: 4 per image with
# several images, 1 per video frame.
REQUESTS = [("4 photos", 4, (1920, 1080), 4), ("video, 12 frames", 12, (1280, 720), 1)]


def pillow_baseline(pre: Ovis2ImagePreprocessor, image: Image.Image, max_partition: int) -> np.ndarray:
    side = pre.side
    _, boxes = pre.boxes(image.width, image.height, max_partition)
    crops = [image.crop(box) for box in boxes]
    # Every uint8 level normalizes to one float32 per channel: a 256 x 3 lookup table.
    levels = np.arange(256, dtype=np.float64)[:, None] * pre.rescale_factor
    table = ((levels.astype(np.float32) - pre.mean) / pre.std).astype(np.float32)
    values = np.zeros((len(crops), 3, side, side), dtype=np.float32)
    for index, crop in enumerate(crops):
        width, height, top, left = pre.placement(*crop.size)
        pixels = np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC))
        for channel in range(3):
            np.take(table[:, channel], pixels[:, :, channel],
                    out=values[index, channel, top: top + height, left: left + width])
    return values


def _ms(call: Callable[[], Any]) -> float:
    """Milliseconds one call takes."""
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def _as_served() -> Ovis2ImagePreprocessor:
    """One thread, and Pillow holding whole images in one block, as in the model process."""
    torch.set_num_threads(1)
    hold_whole_images(MediaLimits().max_image_pixels)
    pre = Ovis2ImagePreprocessor({"crop_size": {"height": 448, "width": 448}})
    pre.warm_up()
    return pre


def run(repeats: int = 10, sizes=SIZES, partitions=PARTITIONS) -> List[Dict[str, Any]]:
    pre = _as_served()
    rng = np.random.default_rng(0)
    rows = []
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for max_partition in partitions:
            out = pre(image, max_partition)
            if not np.array_equal(out.pixel_values.numpy(), pillow_baseline(pre, image, max_partition)):
                raise AssertionError(f"{width}x{height} max_partition {max_partition}: output differs from Pillow's")
            ours, baseline = [], []
            for _ in range(repeats):
                ours.append(_ms(lambda: pre(image, max_partition)))
                baseline.append(_ms(lambda: pillow_baseline(pre, image, max_partition)))
            # Interleaved with the baseline, the image and our buffers leave the caches between
            # our calls; served, an image is preprocessed right after it is decoded, its pixels
            # still in cache. Both are reported.
            alone = [_ms(lambda: pre(image, max_partition)) for _ in range(repeats)]
            rows.append({
                "width": width, "height": height, "max_partition": max_partition, "grid": list(out.grid),
                "crops": int(out.pixel_values.shape[0]), "ms_median": float(np.median(ours)),
                "ms_min": float(np.min(ours)), "back_to_back_ms_min": float(np.min(alone)),
                "pillow_ms_min": float(np.min(baseline)),
                "speedup": float(np.min(baseline) / np.min(ours)),
            })
    return rows


def run_requests(repeats: int = 10, requests=REQUESTS) -> List[Dict[str, Any]]:
    """All images of a request preprocessed into one tensor, against each image alone and the
    crops stacked afterwards (what serving did before): the same values, one copy fewer."""
    pre = _as_served()
    rng = np.random.default_rng(1)
    rows = []
    for name, count, (width, height), max_partition in requests:
        images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]

        def separate() -> torch.Tensor:
            return torch.cat([pre(image, max_partition).pixel_values for image in images])

        batch = pre.batch(images, max_partition)
        together = batch[0].pixel_values._base
        if not torch.equal(together, separate()):
            raise AssertionError(f"{name}: one tensor for the request differs from the images stacked apart")
        ours, baseline = [], []
        for _ in range(repeats):
            ours.append(_ms(lambda: pre.batch(images, max_partition)))
            baseline.append(_ms(separate))
        rows.append({
            "request": name, "images": count, "size": f"{width}x{height}", "max_partition": max_partition,
            "crops": int(together.shape[0]), "ms_min": float(np.min(ours)), "stacked_apart_ms_min": float(np.min(baseline)),
            "speedup": float(np.min(baseline) / np.min(ours)),
        })
    return rows
