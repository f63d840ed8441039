"""Bicubic resizing bit-identical to Pillow 13's, compiled with numba.

The original Ovis2 preprocessing resizes every crop with Pillow's bicubic filter, so the
model saw exactly those pixels. Pillow's resampler is scalar C: on a 1920x1080 photo at
``max_partition`` 9 its resizes took about 70% of preprocessing. This module does the same
fixed-point arithmetic (22-bit integer coefficients from the same double-precision filter,
the same 8-bit rounding between the two passes, the same choice of which pass runs first)
with loops that vectorize across rows, so the output is the same bytes, several times
faster. Owning the arithmetic also makes the pixels independent of the installed Pillow:
Pillow 13 started running the vertical pass first when the height shrinks much more than
the width, which changes such images by a few levels in places (a 333x1201 noise image
resized to 124x448: 18% of the bytes, at most 3 levels), and the references were made with
that order.

Images are handled as 2-D ``uint8`` arrays whose rows hold interleaved pixels of 4 bytes,
R, G, B and an unused fourth: the layout Pillow keeps RGB images in, so the pixels are read
where Pillow decoded them, without a copy (Pillow's Arrow export). The vertical pass runs
down the rows as they are; the horizontal pass transposes bands of rows into a small buffer
first, so that both inner loops run over contiguous memory. The last pass writes normalized
floats straight into the planar model input, padding included.
"""

from __future__ import annotations

import math
from typing import Tuple

import nanoarrow
import numpy as np
from numba import njit
from PIL import Image

PRECISION_BITS = 22  # Pillow's 32 - 8 - 2 for 8-bit images
_HALF = 1 << (PRECISION_BITS - 1)
_ONE = float(1 << PRECISION_BITS)
CHANNELS = 3
PIXEL = 4  # bytes per source pixel: R, G, B, unused
STRIP_BYTES = 1 << 20  # rows copied at a time out of an image Pillow holds in several blocks
_TILE = 64  # rows per band of the horizontal pass (a band of a 4000 px wide image: 768 KB, in L2)


@njit(cache=True, nogil=True)
def _bicubic(x: float) -> float:
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@njit(cache=True, nogil=True)
def coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Integer filter taps and (first input index, tap count) per output index.

    Taps that round to 0 at the ends are left out: they add nothing, and an axis that keeps
    its size (taps 0, 1, 0, 0) then costs one multiply per byte instead of four.
    """
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    taps = np.zeros((out_size, ksize), np.int32)
    bounds = np.empty((out_size, 2), np.int64)
    weights = np.empty(ksize)
    fixed = np.empty(ksize, np.int32)
    inverse = 1.0 / filterscale
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = int(center - support + 0.5)
        if lo < 0:
            lo = 0
        hi = int(center + support + 0.5)
        if hi > in_size:
            hi = in_size
        count = hi - lo
        total = 0.0
        for i in range(count):
            w = _bicubic((i + lo - center + 0.5) * inverse)
            weights[i] = w
            total += w
        for i in range(count):
            w = weights[i] / total if total != 0.0 else weights[i]
            fixed[i] = int(-0.5 + w * _ONE) if w < 0 else int(0.5 + w * _ONE)
        first, last = 0, count
        while first < last - 1 and fixed[first] == 0:
            first += 1
        while last > first + 1 and fixed[last - 1] == 0:
            last -= 1
        taps[out, : last - first] = fixed[first:last]
        bounds[out, 0] = lo + first
        bounds[out, 1] = last - first
    return taps, bounds


@njit(cache=True, nogil=True)
def _accumulate(acc: np.ndarray, lines: np.ndarray, lo: int, col0: int, width: int, taps: np.ndarray,
                count: int) -> None:
    """acc[:width] = rounding half + sum over t < count of taps[t] * lines[lo + t, col0:col0 + width]."""
    for j in range(width):
        acc[j] = _HALF
    for t in range(count):
        k = taps[t]
        line = lines[lo + t, col0: col0 + width]  # a slice: indexing it with j alone keeps the loop vectorized
        for j in range(width):
            acc[j] += np.int32(line[j]) * k


@njit(cache=True, nogil=True)
def _byte(total: int) -> int:
    """An accumulated sum back to an 8-bit level: drop the fraction bits, clamp to 0..255."""
    v = total >> PRECISION_BITS
    return 0 if v < 0 else (255 if v > 255 else v)


@njit(cache=True, nogil=True)
def _resample_rows(src: np.ndarray, row_shift: int, col0: int, width: int, taps: np.ndarray,
                   bounds: np.ndarray) -> np.ndarray:
    """One pass along axis 0 over ``src[:, col0:col0 + width]``; input index i is row i + row_shift.

    ``src`` stays a whole C-contiguous array (not a slice) so that numba knows each row is
    contiguous and vectorizes the inner loop.
    """
    out_len = taps.shape[0]
    out = np.empty((out_len, width), np.uint8)
    acc = np.empty(width, np.int32)
    for o in range(out_len):
        _accumulate(acc, src, bounds[o, 0] + row_shift, col0, width, taps[o], bounds[o, 1])
        row = out[o]
        for j in range(width):
            row[j] = _byte(acc[j])
    return out


@njit(cache=True, nogil=True)
def _resample_across(src: np.ndarray, row0: int, nrows: int, col0: int, taps: np.ndarray,
                     bounds: np.ndarray) -> np.ndarray:
    """One pass along the pixel columns of ``src[row0:row0 + nrows]``; input index i is column col0 + i.

    ``src`` holds 4 bytes per pixel (R, G, B, unused); the result holds the 3 colours.

    Works on bands of ``_TILE`` rows: a band's pixels are transposed into a buffer that stays
    in cache, so the multiply-adds run along contiguous memory (across the band's rows) and
    vectorize, and each result goes straight back into row order. No transposed copy of the
    whole image is ever made.
    """
    out_len = taps.shape[0]
    first = bounds[0, 0]
    last = bounds[out_len - 1, 0] + bounds[out_len - 1, 1]
    out = np.empty((nrows, out_len * CHANNELS), np.uint8)
    band = np.empty((last - first, _TILE * CHANNELS), np.uint8)
    acc = np.empty(_TILE * CHANNELS, np.int32)
    result = np.empty(_TILE * CHANNELS, np.uint8)
    for r0 in range(0, nrows, _TILE):
        count = min(_TILE, nrows - r0)
        width = count * CHANNELS
        for col in range(first, last):
            dst = band[col - first]
            x = (col0 + col) * PIXEL
            for r in range(count):
                line = src[row0 + r0 + r]
                dst[r * CHANNELS] = line[x]
                dst[r * CHANNELS + 1] = line[x + 1]
                dst[r * CHANNELS + 2] = line[x + 2]
        for o in range(out_len):
            _accumulate(acc, band, bounds[o, 0] - first, 0, width, taps[o], bounds[o, 1])
            for j in range(width):
                result[j] = _byte(acc[j])
            x = o * CHANNELS
            for r in range(count):
                row = out[r0 + r]
                row[x] = result[r * CHANNELS]
                row[x + 1] = result[r * CHANNELS + 1]
                row[x + 2] = result[r * CHANNELS + 2]
    return out


@njit(cache=True, nogil=True)
def _resample_rows_normalized(src: np.ndarray, row_shift: int, taps: np.ndarray, bounds: np.ndarray,
                              scale: float, mean: np.ndarray, std: np.ndarray, out: np.ndarray,
                              top: int, left: int) -> None:
    """The last pass, along the rows of ``src``, written straight out as normalized floats.

    ``out`` is (3, H, W) float32, one plane per channel, and is filled whole: the resized
    pixels at (top, left) and zeros around them (the original pads in normalized space). The
    arithmetic is the reference's: float64 rescale, then float32 subtract and divide.
    """
    out_len = taps.shape[0]
    width = src.shape[1] // CHANNELS
    acc = np.empty(width * CHANNELS, np.int32)
    out[:, :top, :] = 0.0
    out[:, top + out_len:, :] = 0.0
    out[:, top: top + out_len, :left] = 0.0
    out[:, top: top + out_len, left + width:] = 0.0
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = std[0], std[1], std[2]
    for o in range(out_len):
        _accumulate(acc, src, bounds[o, 0] + row_shift, 0, width * CHANNELS, taps[o], bounds[o, 1])
        red = out[0, top + o, left: left + width]
        green = out[1, top + o, left: left + width]
        blue = out[2, top + o, left: left + width]
        for x in range(width):
            red[x] = (np.float32(_byte(acc[x * CHANNELS]) * scale) - m0) / s0
            green[x] = (np.float32(_byte(acc[x * CHANNELS + 1]) * scale) - m1) / s1
            blue[x] = (np.float32(_byte(acc[x * CHANNELS + 2]) * scale) - m2) / s2


@njit(cache=True, nogil=True)
def vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow 13's pass order: vertical first when the height shrinks over twice as much."""
    return height - out_height > 0 and height - out_height > (width - out_width) * 2


@njit(cache=True, nogil=True)
def _resize(rows: np.ndarray, box: np.ndarray, out_width: int, out_height: int, scale: float,
            mean: np.ndarray, std: np.ndarray, out: np.ndarray, top: int, left: int) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    h_taps, h_bounds = coefficients(x1 - x0, out_width)
    v_taps, v_bounds = coefficients(y1 - y0, out_height)
    # An axis that keeps its size still gets a pass: its one tap is then 1.0 in fixed point,
    # which gives back every byte, as Pillow's skipped pass would.
    if vertical_first(x1 - x0, y1 - y0, out_width, out_height):
        stage = _resample_rows(rows, y0, x0 * PIXEL, (x1 - x0) * PIXEL, v_taps, v_bounds)
        stage = _resample_across(stage, 0, out_height, 0, h_taps, h_bounds)
        same_taps, same_bounds = coefficients(out_height, out_height)
        _resample_rows_normalized(stage, 0, same_taps, same_bounds, scale, mean, std, out, top, left)
        return
    # Horizontal first, only over the rows the vertical pass reads.
    first = v_bounds[0, 0]
    last = v_bounds[out_height - 1, 0] + v_bounds[out_height - 1, 1]
    stage = _resample_across(rows, y0 + first, last - first, x0, h_taps, h_bounds)
    _resample_rows_normalized(stage, -first, v_taps, v_bounds, scale, mean, std, out, top, left)


def _exported(image: Image.Image) -> np.ndarray:
    """Pillow's own pixel bytes, no copy; ValueError when its rows are not in one memory block."""
    data = np.frombuffer(nanoarrow.c_array(image).child(0).view().buffer(1), np.uint8)
    if data.shape[0] != image.width * image.height * PIXEL:
        raise RuntimeError(f"Pillow exported {data.shape[0]} bytes for a {image.width}x{image.height} RGB image, "
                           f"expected {PIXEL} per pixel")
    return data


def _copied(image: Image.Image) -> np.ndarray:
    """The pixel bytes of an image Pillow holds in several memory blocks, copied into one array.

    Pillow cuts strips of rows with one memory copy per row, and each strip is small enough
    to lie in one block and be exported; on a 4000x3000 photo that is about 16 ms, where
    ``tobytes`` takes 57-73 ms on the benchmark machine.
    """
    width = image.width * PIXEL
    step = max(1, STRIP_BYTES // width)
    data = np.empty((image.height, width), np.uint8)
    for top in range(0, image.height, step):
        strip = image.crop((0, top, image.width, min(image.height, top + step)))
        try:
            pixels = _exported(strip)
        except ValueError:  # PILLOW_BLOCK_SIZE set below one strip
            pixels = np.frombuffer(strip.tobytes("raw", "RGBX"), np.uint8)
        data[top: top + strip.height] = pixels.reshape(strip.height, width)
    return data.reshape(-1)


def pixel_rows(image: Image.Image) -> np.ndarray:
    """The image's pixels as read-only rows of R, G, B, unused bytes, where Pillow keeps them.

    Pillow exports an image whose rows lie in one block of memory through the Arrow C data
    interface without copying; ``np.asarray(image)`` goes through ``tobytes``, which repacks
    every pixel (2.5-6 ms for a 1920x1080 photo on the benchmark machine, over a tenth of its
    whole preprocessing). Images over Pillow's allocation block (16 MB unless
    ``PILLOW_BLOCK_SIZE`` says otherwise), such as a 12-megapixel phone photo, are copied.
    """
    try:
        data = _exported(image)
    except ValueError:  # Pillow refuses to export rows that are not in one block
        data = _copied(image)
    rows = data.reshape(image.height, image.width * PIXEL)
    rows.setflags(write=False)  # numba types read-only arrays apart: keep one signature
    return rows


class PixelSource:
    """One decoded RGB image, ready to resize any of its boxes.

    Its pixel rows are shared by the whole image and its crops.
    """

    def __init__(self, image: Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        self._rows = pixel_rows(image)

    def resize_normalized(self, box: Tuple[int, int, int, int], size: Tuple[int, int], scale: float,
                          mean: np.ndarray, std: np.ndarray, out: np.ndarray, top: int, left: int) -> None:
        """Resize ``box`` to ``size`` (width, height), normalize, write into ``out`` at (top, left).

        All of ``out`` (3, H, W) is written: what lies around the resized pixels becomes 0.
        """
        out_width, out_height = size
        _resize(self._rows, np.asarray(box, np.int64), out_width, out_height, scale, mean, std, out, top, left)
