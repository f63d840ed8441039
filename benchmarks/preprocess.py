"""Image preprocessing cost: ms per image on one CPU core, 448 px crops."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image

from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor

SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
PARTITIONS = [1, 4, 9]


def run(repeats: int = 10, sizes=SIZES, partitions=PARTITIONS) -> List[Dict[str, Any]]:
    torch.set_num_threads(1)
    pre = Ovis2ImagePreprocessor({"crop_size": {"height": 448, "width": 448}})
    rng = np.random.default_rng(0)
    rows = []
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for max_partition in partitions:
            out = pre(image, max_partition)  # warm-up
            timings = []
            for _ in range(repeats):
                start = time.perf_counter()
                pre(image, max_partition)
                timings.append((time.perf_counter() - start) * 1000)
            rows.append({
                "width": width, "height": height, "max_partition": max_partition, "grid": list(out.grid),
                "crops": int(out.pixel_values.shape[0]), "ms_median": float(np.median(timings)),
                "ms_min": float(np.min(timings)),
            })
    return rows
