"""The numba resizer against Pillow itself: every output byte must be equal.

The references were made with Pillow 13 (its vertical-first order for tall reductions is
visible in ``single_tall``), so Pillow 13 is the oracle; cases pick sizes on both sides of
its pass-order rule, upscales, unchanged axes and sub-boxes of a larger image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL
import pytest
from llvmlite import binding as llvm
from numba import njit
from PIL import Image

from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
from ovis2_xinf.resample import (PixelSource, _grid_rows, _load4, _store4, coefficients, hold_whole_images,
                                  pixel_rows, vertical_first)


def test_oracle_is_pillow_13():
    # The test extra requires it; an older Pillow resizes tall images in the other order.
    assert int(PIL.__version__.split(".")[0]) >= 13


IDENTITY_MEAN = np.zeros(3, np.float32)
IDENTITY_STD = np.ones(3, np.float32)


def _ours(pixels: np.ndarray, box, size) -> np.ndarray:
    """Resized bytes, read back through an identity normalization (scale 1, mean 0, std 1)."""
    out = np.zeros((1, 3, size[1], size[0]), np.float32)
    PixelSource(Image.fromarray(pixels)).resize_boxes([box], [size], [(0, 0)], 1, 1.0, IDENTITY_MEAN, IDENTITY_STD, out)
    return out[0].transpose(1, 2, 0).astype(np.uint8)


def _pillow(pixels: np.ndarray, box, size) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).crop(box).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize(
    "image_size,box,size",
    [
        ((1920, 1080), (0, 0, 1920, 1080), (448, 252)),     # thumbnail, horizontal first
        ((1920, 1080), (480, 540, 960, 1080), (398, 448)),  # a crop of a 2x4 grid
        ((333, 1201), (0, 0, 333, 1201), (124, 448)),       # tall: Pillow 13 goes vertical first
        ((1201, 333), (0, 0, 1201, 333), (448, 124)),
        ((90, 270), (45, 0, 90, 135), (18, 56)),            # the fixture's tall image, one crop
        ((20, 20), (0, 0, 20, 20), (448, 448)),             # upscale
        ((640, 480), (0, 0, 640, 480), (640, 240)),         # width unchanged
        ((640, 480), (0, 0, 640, 480), (320, 480)),         # height unchanged
        ((64, 64), (0, 0, 64, 64), (64, 64)),               # nothing to do
        ((1, 900), (0, 0, 1, 900), (1, 448)),
        ((4000, 3000), (1333, 1000, 2666, 2000), (448, 336)),
    ],
)
def test_resize_equals_pillow(image_size, box, size):
    rng = np.random.default_rng(sum(image_size) + sum(size))
    pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    np.testing.assert_array_equal(_ours(pixels, box, size), _pillow(pixels, box, size))


def test_random_sizes_equal_pillow():
    rng = np.random.default_rng(13)
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(1, 700, 2))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1)))
        size = tuple(int(v) for v in rng.integers(1, 500, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        np.testing.assert_array_equal(_ours(pixels, box, size), _pillow(pixels, box, size),
                                      err_msg=f"image {width}x{height} box {box} -> {size}")


def test_smooth_image_equals_pillow():
    # Random noise rarely lands near a rounding boundary the way flat gradients do.
    y, x = np.mgrid[0:700, 0:1000]
    pixels = np.stack([(x * 255 // 999), (y * 255 // 699), ((x + y) % 256)], axis=-1).astype(np.uint8)
    for size in [(448, 313), (313, 448), (1000, 448), (17, 9)]:
        np.testing.assert_array_equal(_ours(pixels, (0, 0, 1000, 700), size),
                                      _pillow(pixels, (0, 0, 1000, 700), size))


def _grid_bytes(pixels: np.ndarray, max_partition: int, side: int = 448):
    """Every box of the Ovis2 grid, resized by ``resize_boxes`` and by Pillow, as bytes."""
    pre = Ovis2ImagePreprocessor({"crop_size": {"height": side, "width": side}, "image_mean": [0, 0, 0],
                                  "image_std": [1, 1, 1], "rescale_factor": 1.0})
    image = Image.fromarray(pixels)
    grid, boxes = pre.boxes(image.width, image.height, max_partition)
    values = pre(image, max_partition).pixel_values.numpy()
    for index, box in enumerate(boxes):
        width, height, top, left = pre.placement(box[2] - box[0], box[3] - box[1])
        ours = values[index, :, top: top + height, left: left + width].transpose(1, 2, 0).astype(np.uint8)
        yield box, (width, height), grid, ours, _pillow(pixels, box, (width, height))


@pytest.mark.parametrize("image_size,max_partition,whole_first,crops_first", [
    ((1920, 1080), 9, "horizontal", "horizontal"),  # one sweep: the whole image and each row of crops together
    ((1001, 1081), 4, "horizontal", "horizontal"),  # rows of crops 540 and 541 high: resized to different widths
    ((1080, 2400), 9, "vertical", "horizontal"),    # the crops swept together, the whole image alone
    ((400, 4000), 2, "vertical", "vertical"),       # every box alone
    ((100, 60), 4, "horizontal", "horizontal"),     # upscaled crops
])
def test_an_ovis2_grid_equals_pillow_box_by_box(image_size, max_partition, whole_first, crops_first):
    rng = np.random.default_rng(sum(image_size) + max_partition)
    pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
    for index, (box, size, grid, ours, pillow) in enumerate(_grid_bytes(pixels, max_partition)):
        order = "vertical" if vertical_first(box[2] - box[0], box[3] - box[1], *size) else "horizontal"
        assert order == (whole_first if index == 0 else crops_first), (box, size)
        np.testing.assert_array_equal(ours, pillow, err_msg=f"grid {grid} box {box} -> {size}")


def test_random_grids_equal_pillow():
    rng = np.random.default_rng(17)
    for _ in range(25):
        width, height = (int(v) for v in rng.integers(1, 900, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        max_partition = int(rng.integers(1, 10))
        side = int(rng.choice([28, 56, 448]))
        for box, size, grid, ours, pillow in _grid_bytes(pixels, max_partition, side):
            np.testing.assert_array_equal(ours, pillow, err_msg=f"image {width}x{height} max_partition "
                                          f"{max_partition} side {side}: grid {grid} box {box} -> {size}")


def test_which_boxes_share_a_sweep():
    pre = Ovis2ImagePreprocessor({"crop_size": {"height": 448, "width": 448}})
    grid, boxes = pre.boxes(1920, 1080, 9)
    assert _grid_rows(np.asarray(boxes), grid[1], 1920, 1080) == grid[0] == 2
    assert _grid_rows(np.asarray(boxes[1:]), grid[1], 1920, 1080) == 0  # no whole image first
    assert _grid_rows(np.asarray(boxes), 3, 1920, 1080) == 0
    assert _grid_rows(np.asarray([(0, 0, 500, 300), (10, 20, 260, 200), (200, 20, 480, 290)]), 2, 500, 300) == 0


def test_boxes_that_are_not_a_grid_are_resized_one_by_one():
    # Boxes that do not tile the image row by row share no pass, and come out the same.
    rng = np.random.default_rng(19)
    pixels = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    boxes = [(0, 0, 500, 300), (10, 20, 260, 200), (200, 20, 480, 290)]
    sizes = [(112, 67), (90, 64), (70, 66)]
    out = np.zeros((3, 3, 112, 112), np.float32)
    PixelSource(Image.fromarray(pixels)).resize_boxes(boxes, sizes, [(0, 0)] * 3, 2, 1.0, IDENTITY_MEAN,
                                                      IDENTITY_STD, out)
    for index, (box, size) in enumerate(zip(boxes, sizes)):
        ours = out[index, :, : size[1], : size[0]].transpose(1, 2, 0).astype(np.uint8)
        np.testing.assert_array_equal(ours, _pillow(pixels, box, size))


def test_pass_order_rule():
    assert vertical_first(333, 1201, 124, 448)
    assert not vertical_first(1201, 333, 448, 124)
    assert not vertical_first(1920, 1080, 448, 252)
    assert not vertical_first(20, 20, 448, 448)


def test_coefficients_sum_to_one():
    for in_size, out_size in [(1920, 448), (540, 448), (20, 448), (7, 7)]:
        taps, bounds = coefficients(in_size, out_size)
        assert (np.abs(taps.sum(axis=1) - (1 << 22)) <= taps.shape[1]).all()
        assert (bounds[:, 0] >= 0).all() and (bounds.sum(axis=1) <= in_size).all()


def test_rejects_non_rgb_images():
    with pytest.raises(ValueError, match="mode RGBA"):
        PixelSource(Image.new("RGBA", (4, 4)))


@pytest.mark.parametrize("box,size,top,left", [((0, 0, 300, 100), (60, 20), 5, 3),    # horizontal first
                                               ((0, 0, 30, 400), (12, 40), 2, 9)])   # vertical first
def test_writes_the_whole_output_padding_zero(box, size, top, left):
    # The caller hands in uninitialized memory: every value outside the resized box must be written as 0.
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (box[3], box[2], 3), dtype=np.uint8)
    whole = np.full((1, 3, 50, 80), np.nan, np.float32)
    PixelSource(Image.fromarray(pixels)).resize_boxes([box], [size], [(top, left)], 1, 1.0, IDENTITY_MEAN, IDENTITY_STD,
                                                      whole)
    out = whole[0]
    inside = out[:, top: top + size[1], left: left + size[0]]
    np.testing.assert_array_equal(inside.transpose(1, 2, 0).astype(np.uint8), _pillow(pixels, box, size))
    inside[:] = 0
    assert not np.isnan(out).any() and not out.any()


def test_an_unchanged_axis_is_one_unit_tap():
    # Zero taps are dropped, so keeping a size costs one multiply per byte and returns it unchanged.
    taps, bounds = coefficients(37, 37)
    assert (bounds[:, 1] == 1).all() and (bounds[:, 0] == np.arange(37)).all()
    assert (taps[:, 0] == 1 << 22).all()


def test_pixel_rows_are_pillows_own_memory():
    # The pixels are read where Pillow keeps them, no copy: a change to the image shows in the rows.
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    rows = pixel_rows(image)
    assert rows.shape == (120, 160 * 4) and not rows.flags.writeable
    np.testing.assert_array_equal(rows.reshape(120, 160, 4)[..., :3], pixels)
    image.putpixel((5, 7), (1, 2, 3))
    assert tuple(rows[7, 20:23]) == (1, 2, 3)


def test_pixel_rows_outlive_the_image():
    # The exported rows hold Pillow's memory: images made after the first is dropped must not reuse it.
    pixels = np.random.default_rng(4).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rows = pixel_rows(Image.fromarray(pixels))
    others = [Image.new("RGB", (400, 300), (9, 9, 9)) for _ in range(4)]
    np.testing.assert_array_equal(rows.reshape(300, 400, 4)[..., :3], pixels)
    assert all(np.array_equal(pixel_rows(other)[:, :3], [[9, 9, 9]] * 300) for other in others)


@pytest.fixture
def block_size():
    """Pillow's block size, put back after the test: it is process-wide."""
    previous = Image.core.get_block_size()
    yield
    Image.core.set_block_size(previous)


def test_pixel_rows_of_an_image_over_one_memory_block(block_size):
    # 2100 x 2100 x 4 bytes is over Pillow's default 16 MB block: Pillow refuses the export, the rows
    # are a copy, made of strips that each export.
    Image.core.set_block_size(16 << 20)
    pixels = np.random.default_rng(5).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    rows = pixel_rows(image)
    np.testing.assert_array_equal(rows.reshape(2100, 2100, 4)[..., :3], pixels)
    image.putpixel((0, 0), tuple(int(v) for v in 255 - pixels[0, 0]))
    assert not rows.flags.writeable and tuple(rows[0, :3]) == tuple(pixels[0, 0])


def test_whole_images_are_read_in_place_once_held_in_one_block(block_size):
    # What the model process does at load: images up to its pixel limit are then one block each.
    Image.core.set_block_size(16 << 20)
    hold_whole_images(2100 * 2100)
    assert Image.core.get_block_size() == 17641472  # 2100 * 2100 * 4 rounded up to whole 4 KiB pages
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (2100, 2100, 3), dtype=np.uint8))
    rows = pixel_rows(image)
    image.putpixel((3, 2099), (1, 2, 3))
    assert tuple(rows[2099, 12:15]) == (1, 2, 3)  # Pillow's own memory, not a copy
    hold_whole_images(10)  # never lowered
    assert Image.core.get_block_size() == 17641472
    hold_whole_images(10**12)  # Pillow keeps it in a C int
    assert Image.core.get_block_size() == 2**31 - 4096


def test_pixel_rows_when_a_strip_is_over_one_block():
    # PILLOW_BLOCK_SIZE can make blocks smaller than a strip: the strips are then repacked by Pillow.
    previous = Image.core.get_block_size()
    Image.core.set_block_size(1 << 16)
    try:
        pixels = np.random.default_rng(6).integers(0, 256, (200, 300, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        with pytest.raises(ValueError):
            image.__arrow_c_array__()
        rows = pixel_rows(image)
    finally:
        Image.core.set_block_size(previous)
    np.testing.assert_array_equal(rows.reshape(200, 300, 4)[..., :3], pixels)


_VECTORS_PROBE = """
import json
import numba
import numpy as np
from llvmlite import binding as llvm
from ovis2_xinf import resample
acc = np.empty(192, np.int32)
resample._accumulate(acc, np.ones((4, 192), np.uint8), 0, 0, 192, np.full(4, 3, np.int32), 4)
assert acc[0] == (1 << 21) + 12
asm = next(iter(resample._accumulate.inspect_asm().values()))
print(json.dumps({"features": numba.config.CPU_FEATURES, "zmm": "zmm" in asm,
                  "avx512f": "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")}))
"""


def _probe_vectors(tmp_path, **env) -> dict:
    """A fresh interpreter (numba's features are fixed at its first compile), compiling anew."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
    environ.update(NUMBA_CACHE_DIR=str(tmp_path / "numba"), **env)
    done = subprocess.run([sys.executable, "-c", _VECTORS_PROBE], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_kernels_use_512_bit_vectors_where_the_cpu_has_them(tmp_path):
    probe = _probe_vectors(tmp_path)
    if not probe["avx512f"]:
        assert probe["features"] is None  # left to numba
        pytest.skip("this CPU has no AVX-512")
    assert probe["features"].endswith(",-prefer-256-bit")
    assert probe["zmm"]


def test_user_cpu_features_win(tmp_path):
    features = llvm.get_host_cpu_features().flatten()
    assert _probe_vectors(tmp_path, NUMBA_CPU_FEATURES=features)["features"] == features


@njit
def _move4(src, i, dst, j):
    _store4(dst, np.uint64(j), _load4(src, np.uint64(i)))


def test_four_byte_moves_at_any_alignment():
    # The horizontal pass moves 3-byte pixels 4 bytes at a time, at offsets 3 apart.
    dst = np.zeros(12, np.uint8)
    _move4(np.arange(10, 20, dtype=np.uint8), 5, dst, 3)
    assert dst.tolist() == [0, 0, 0, 15, 16, 17, 18, 0, 0, 0, 0, 0]
