"""Image preprocessing that reproduces the original Ovis2 implementation exactly.

The original picks a crop grid as (rows, cols) by covering ratio, resizes each crop
keeping its aspect ratio and pads it to a square in normalized space; transformers'
native ``Ovis2ImageProcessor`` transposes the grid for non-square images and stretches
crops instead, so it cannot be used for checkpoints trained the original way. This is
where the image grid is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import json

import numpy as np
import torch
from PIL import Image

from .resample import PixelSource

# Placeholder layout of one image, in the original's symbolic ids.
IMAGE_ATOM = "atom"
INDICATORS = ("start", "separator", "col", "row", "end")
COVERING_THRESHOLD = 0.9
#: Crops per image a request may ask for, unless the launch says otherwise. The AIDC-AI code
#: and cards use 9 (one image), 4 (several) and 1 (video); 16 leaves room for large documents.
DEFAULT_MAX_PARTITION_LIMIT = 16
#: The highest limit a launch may set: choosing a grid costs about max_partition² · log
#: box evaluations in Python, a few milliseconds at 64.
MAX_PARTITION_CEILING = 64

Grid = Tuple[int, int]
Box = Tuple[int, int, int, int]


def partition(width: int, height: int, grid: Grid) -> List[Box]:
    """Crop boxes for a (rows, cols) grid; the last row/column absorbs the remainder."""
    rows, cols = grid
    row_height = height // rows
    col_width = width // cols
    boxes = []
    for row in range(rows):
        for col in range(cols):
            left = col * col_width
            upper = row * row_height
            right = width if col == cols - 1 else (col + 1) * col_width
            lower = height if row == rows - 1 else (row + 1) * row_height
            boxes.append((left, upper, right, lower))
    return boxes


def _covering_area(box: Box, side: int) -> float:
    long_edge = box[2] - box[0]
    short_edge = box[3] - box[1]
    long_edge, short_edge = max(long_edge, short_edge), min(long_edge, short_edge)
    if long_edge > side:
        short_edge = short_edge / long_edge * side
        long_edge = side
    return long_edge * short_edge


def choose_grid(width: int, height: int, side: int, max_partition: int) -> Grid:
    """The smallest grid covering more than 90% of the image at crop resolution.

    Ties go to the higher covering ratio; if no grid covers enough, the best-covering
    grid wins, ties going to fewer crops. Only grids within ``max_partition`` are visited,
    in the original's order (rows, then columns) and with its summation order, so ties
    and float rounding resolve exactly as there.
    """
    if max_partition < 1:
        raise ValueError(f"max_partition must be at least 1, got {max_partition}")
    area = width * height
    scored = []
    for rows in range(1, max_partition + 1):
        for cols in range(1, max_partition // rows + 1):
            ratio = sum(_covering_area(b, side) for b in partition(width, height, (rows, cols))) / area
            scored.append(((rows, cols), ratio))
    good = [item for item in scored if item[1] > COVERING_THRESHOLD]
    if good:
        return min(good, key=lambda x: (x[0][0] * x[0][1], -x[1]))[0]
    return min(scored, key=lambda x: (-x[1], x[0][0] * x[0][1]))[0]


def placeholder_layout(grid: Grid) -> List[str]:
    """Symbolic placeholder sequence of one image: indicators around one atom per crop."""
    start, separator, col_sep, row_sep, end = INDICATORS
    layout = [start, IMAGE_ATOM, separator]
    rows, cols = grid
    if rows * cols > 1:
        for row in range(rows):
            for col in range(cols):
                layout.append(IMAGE_ATOM)
                if col < cols - 1:
                    layout.append(col_sep)
            if row < rows - 1:
                layout.append(row_sep)
    layout.append(end)
    return layout


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # (crops, 3, side, side), float32
    grid: Grid
    layout: List[str]


class Ovis2ImagePreprocessor:
    """Per-checkpoint preprocessing, configured from ``preprocessor_config.json``."""

    def __init__(self, config: Dict[str, Any]):
        crop = config.get("crop_size") or {}
        size = config.get("size") or {}
        side = crop.get("height") or size.get("shortest_edge") or size.get("height")
        if not side or (crop and crop.get("height") != crop.get("width")):
            raise ValueError(f"preprocessor_config.json: need a square crop_size, got {crop or size}")
        self.side = int(side)
        self.mean = np.asarray(config.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), dtype=np.float32)
        self.std = np.asarray(config.get("image_std", (0.26862954, 0.26130258, 0.27577711)), dtype=np.float32)
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))
        resample = int(config.get("resample", Image.Resampling.BICUBIC))
        if resample != Image.Resampling.BICUBIC:
            raise ValueError(f"preprocessor_config.json: resample {resample} is not bicubic (3), the only filter "
                             "Ovis2 checkpoints use and the only one implemented")

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "Ovis2ImagePreprocessor":
        config_path = Path(path) / "preprocessor_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{config_path}: missing (the checkpoint needs its preprocessor config)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path}: not valid JSON: {exc}") from None
        return cls(config)

    def boxes(self, width: int, height: int, max_partition: int, grid: Optional[Grid] = None
              ) -> Tuple[Grid, List[Box]]:
        """The grid (unless chosen already) and the boxes to resize: the whole image first when
        there are several crops."""
        grid = self.grid(width, height, max_partition) if grid is None else grid
        boxes = partition(width, height, grid)
        if len(boxes) > 1:
            boxes.insert(0, (0, 0, width, height))
        return grid, boxes

    def grid(self, width: int, height: int, max_partition: int) -> Grid:
        """The grid an image gets, without resizing anything: a request's cost is checked with
        it before any pixel is resized."""
        return choose_grid(width, height, self.side, max_partition)

    def placement(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """(width, height, top, left) of a crop in its square: the long side becomes the crop
        side, aspect kept, centred on the long axis; the padding stays 0 in normalized space.

        The short side keeps at least one pixel: the original rounds it down to 0 for a crop
        over ``side`` times longer than wide (a 1x900 image) and then fails to resize it.
        """
        side = self.side
        if width == height:
            return side, side, 0, 0
        if width > height:
            new_height = max(1, int(height / width * side))
            return side, new_height, (side - new_height) // 2, 0
        new_width = max(1, int(width / height * side))
        return new_width, side, 0, (side - new_width) // 2

    def __call__(self, image: Image.Image, max_partition: int) -> ProcessedImage:
        return self.batch([image], max_partition)[0]

    def batch(self, images: Sequence[Image.Image], max_partition: int,
              grids: Optional[Sequence[Grid]] = None) -> List[ProcessedImage]:
        """Every image's crops written into one tensor; each image's pixel values are a slice of it.

        The model takes the crops of all images of a request stacked in one tensor: stacking
        tensors made one per image copies every crop once more (21 MiB per photo at
        ``max_partition`` 9). ``prompt.encode`` hands the shared tensor on as it is. ``grids``:
        each image's grid when the caller chose them already (to check the request's cost).
        """
        grids = grids if grids is not None else [None] * len(images)
        plans = [self.boxes(image.width, image.height, max_partition, grid) for image, grid in zip(images, grids)]
        # Not zeroed: each crop's resize writes its whole square, padding included.
        values = np.empty((sum(len(boxes) for _, boxes in plans), 3, self.side, self.side), dtype=np.float32)
        stacked = torch.from_numpy(values)
        processed = []
        start = 0
        for image, (grid, boxes) in zip(images, plans):
            placements = [self.placement(box[2] - box[0], box[3] - box[1]) for box in boxes]
            source = PixelSource(image if image.mode == "RGB" else image.convert("RGB"))
            source.resize_boxes(boxes, [p[:2] for p in placements], [p[2:] for p in placements], grid[1],
                                self.rescale_factor, self.mean, self.std, values[start: start + len(boxes)])
            processed.append(ProcessedImage(stacked[start: start + len(boxes)], grid, placeholder_layout(grid)))
            start += len(boxes)
        return processed

    def warm_up(self) -> None:
        """Compile the resizing kernels now (seconds the first time, cached on disk after).

        numba compiles a whole kernel, every branch, for the argument types of its first
        call, and ``PixelSource`` always passes the same types: one image compiles all of it,
        so no image request pays for compilation.
        """
        self(Image.new("RGB", (self.side, self.side * 3)), 3)
