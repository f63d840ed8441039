"""Grid choice and placeholder layout of the original Ovis2 preprocessing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import TINY
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor, choose_grid, partition, placeholder_layout


def test_partition_covers_the_image_exactly():
    boxes = partition(201, 100, (2, 3))
    assert boxes[0] == (0, 0, 67, 50) and boxes[-1] == (134, 50, 201, 100)
    assert sum((r - l) * (b - t) for l, t, r, b in boxes) == 201 * 100


@pytest.mark.parametrize(
    "size,max_partition,grid",
    [
        ((448, 448), 9, (1, 1)),
        ((896, 448), 9, (1, 2)),   # wide: (rows, cols), not transposed
        ((448, 896), 9, (2, 1)),
        ((1920, 1080), 9, (2, 4)),
        ((1920, 1080), 4, (2, 2)),
        ((1920, 1080), 1, (1, 1)),
        ((20, 20), 9, (1, 1)),
    ],
)
def test_choose_grid(size, max_partition, grid):
    assert choose_grid(*size, side=448, max_partition=max_partition) == grid


def test_choose_grid_rejects_zero():
    with pytest.raises(ValueError, match="max_partition must be at least 1"):
        choose_grid(10, 10, 448, 0)


def test_placeholder_layout():
    assert placeholder_layout((1, 1)) == ["start", "atom", "separator", "end"]
    assert placeholder_layout((2, 2)) == [
        "start", "atom", "separator", "atom", "col", "atom", "row", "atom", "col", "atom", "end"]


def test_wide_crop_is_padded_not_stretched():
    pre = Ovis2ImagePreprocessor.from_pretrained(TINY)
    out = pre(Image.new("RGB", (112, 28), (255, 255, 255)), max_partition=1)
    assert out.grid == (1, 1) and out.pixel_values.shape == (1, 3, 56, 56)
    rows = out.pixel_values[0, 0].abs().sum(dim=1)
    assert torch.all(rows[:21] == 0) and torch.all(rows[21:35] > 0) and torch.all(rows[35:] == 0)


def test_a_sliver_keeps_one_pixel():
    # A side that rounds down to 0 pixels made the original fail; here it keeps one column.
    pre = Ovis2ImagePreprocessor.from_pretrained(TINY)
    out = pre(Image.new("RGB", (1, 900), (255, 255, 255)), max_partition=9)
    side = pre.side
    nonzero = out.pixel_values.abs().sum(dim=(1, 2)) > 0  # (crops, width): columns holding pixels
    assert nonzero.sum(dim=1).tolist() == [1] * out.pixel_values.shape[0]
    assert nonzero[:, (side - 1) // 2].all()


def test_rgba_and_grayscale_become_rgb():
    pre = Ovis2ImagePreprocessor.from_pretrained(TINY)
    assert pre(Image.new("RGBA", (30, 30)), 9).pixel_values.shape[1] == 3
    assert pre(Image.new("L", (30, 30)), 9).pixel_values.shape[1] == 3


def test_non_square_crop_config_is_refused():
    with pytest.raises(ValueError, match="need a square crop_size"):
        Ovis2ImagePreprocessor({"crop_size": {"height": 448, "width": 336}})


def test_a_filter_other_than_bicubic_is_refused_by_name():
    with pytest.raises(ValueError, match=r"preprocessor_config.json: resample 2 is not bicubic \(3\)"):
        Ovis2ImagePreprocessor({"crop_size": {"height": 448, "width": 448}, "resample": 2})


WARM_UP_CHECK = r"""
import numpy as np
from numba.core.registry import CPUDispatcher
from PIL import Image
from ovis2_xinf import resample
from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor

kernels = [f for f in vars(resample).values() if isinstance(f, CPUDispatcher)]
def signatures():
    return sum(len(kernel.signatures) for kernel in kernels)

pre = Ovis2ImagePreprocessor({"crop_size": {"height": 56, "width": 56}})
pre.warm_up()
compiled = signatures()
rng = np.random.default_rng(0)
for width, height in [(200, 100), (90, 270), (56, 56), (20, 20), (56, 300)]:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    for max_partition in (1, 9):
        pre(image, max_partition)
print(len(kernels) > 3, compiled > 0, signatures() - compiled)
"""


def test_after_warm_up_no_image_compiles_anything():
    """Requests must never pay numba's compile time: in a fresh process, one warm-up
    compiles (or loads from cache) every kernel, and images of both pass orders,
    unchanged axes and upscales add no signature to any of them."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WARM_UP_CHECK], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["True", "True", "0"]
