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

Images are handled as 2-D ``uint8`` arrays whose rows hold interleaved RGB triples. Each
pass resamples along the first axis, so its inner loop runs over a contiguous row; the
other direction is reached by transposing ("columns" = the image transposed, one row per
pixel column). The second pass runs on one plane per channel, so that it writes normalized
floats straight into the planar model input, padding included.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from numba import njit
from PIL import Image

PRECISION_BITS = 22  # Pillow's 32 - 8 - 2 for 8-bit images
_HALF = 1 << (PRECISION_BITS - 1)
_ONE = float(1 << PRECISION_BITS)
CHANNELS = 3
_TILE = 64  # pixels per side of the tiles transposes work in (64 x 64 x 3 bytes fit the L1 cache)


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
        acc[:] = _HALF
        lo = bounds[o, 0] + row_shift
        for t in range(bounds[o, 1]):
            k = taps[o, t]
            line = src[lo + t, col0: col0 + width]
            for j in range(width):
                acc[j] += np.int32(line[j]) * k
        row = out[o]
        for j in range(width):
            v = acc[j] >> PRECISION_BITS
            row[j] = 0 if v < 0 else (255 if v > 255 else v)
    return out


@njit(cache=True, nogil=True)
def _interleaved_columns(stage: np.ndarray) -> np.ndarray:
    """(rows, cols * 3) -> (cols, rows * 3): swap the pixel axes, keeping each RGB triple."""
    rows = stage.shape[0]
    cols = stage.shape[1] // CHANNELS
    out = np.empty((cols, rows * CHANNELS), np.uint8)
    for r0 in range(0, rows, _TILE):
        r1 = min(r0 + _TILE, rows)
        for col in range(cols):
            dst = out[col]
            for r in range(r0, r1):
                for c in range(CHANNELS):
                    dst[r * CHANNELS + c] = stage[r, col * CHANNELS + c]
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
        for j in range(width * CHANNELS):
            acc[j] = _HALF
        lo = bounds[o, 0] + row_shift
        for t in range(bounds[o, 1]):
            k = taps[o, t]
            line = src[lo + t]
            for j in range(width * CHANNELS):
                acc[j] += np.int32(line[j]) * k
        red = out[0, top + o, left: left + width]
        green = out[1, top + o, left: left + width]
        blue = out[2, top + o, left: left + width]
        for x in range(width):
            r = min(max(acc[x * CHANNELS] >> PRECISION_BITS, 0), 255)
            g = min(max(acc[x * CHANNELS + 1] >> PRECISION_BITS, 0), 255)
            b = min(max(acc[x * CHANNELS + 2] >> PRECISION_BITS, 0), 255)
            red[x] = (np.float32(r * scale) - m0) / s0
            green[x] = (np.float32(g * scale) - m1) / s1
            blue[x] = (np.float32(b * scale) - m2) / s2


def vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Pillow 13's pass order: vertical first when the height shrinks over twice as much."""
    return height - out_height > 0 and height - out_height > (width - out_width) * 2


@njit(cache=True, nogil=True)
def _resize(rows: np.ndarray, columns: np.ndarray, box: np.ndarray, out_width: int, out_height: int,
            v_first: bool, scale: float, mean: np.ndarray, std: np.ndarray, out: np.ndarray,
            top: int, left: int) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    h_taps, h_bounds = coefficients(x1 - x0, out_width)
    v_taps, v_bounds = coefficients(y1 - y0, out_height)
    # An axis that keeps its size still gets a pass: its one tap is then 1.0 in fixed point,
    # which gives back every byte, as Pillow's skipped pass would.
    if v_first:
        stage = _resample_rows(rows, y0, x0 * CHANNELS, (x1 - x0) * CHANNELS, v_taps, v_bounds)
        stage = _resample_rows(_interleaved_columns(stage), 0, 0, out_height * CHANNELS, h_taps, h_bounds)
        same_taps, same_bounds = coefficients(out_height, out_height)
        _resample_rows_normalized(_interleaved_columns(stage), 0, same_taps, same_bounds, scale, mean, std,
                                  out, top, left)
        return
    # Along the rows first (on the transposed image), only over the rows the vertical pass reads.
    first = v_bounds[0, 0]
    last = v_bounds[out_height - 1, 0] + v_bounds[out_height - 1, 1]
    stage = _resample_rows(columns, x0, (y0 + first) * CHANNELS, (last - first) * CHANNELS, h_taps, h_bounds)
    _resample_rows_normalized(_interleaved_columns(stage), -first, v_taps, v_bounds, scale, mean, std,
                              out, top, left)


# Stands in for the array a resize does not read. Read-only like every array
# ``PixelSource`` passes, so that ``_resize`` is compiled for one signature only.
_NO_PIXELS = np.empty((0, 0), np.uint8)
_NO_PIXELS.setflags(write=False)


class PixelSource:
    """One decoded RGB image, ready to resize any of its boxes.

    Its pixel rows are taken from Pillow once per image, and the transposed image that
    horizontal-first passes read is built from them on first need; both are shared by the
    whole image and its crops. (Transposing here is about twice as fast as Pillow's
    transpose followed by a second copy out of Pillow.)
    """

    def __init__(self, image: Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        self._rows = self._read_only(np.asarray(image).reshape(image.height, image.width * CHANNELS))
        self._columns: Optional[np.ndarray] = None

    @staticmethod
    def _read_only(pixels: np.ndarray) -> np.ndarray:
        pixels.setflags(write=False)  # numba types read-only arrays apart: keep one signature
        return pixels

    def resize_normalized(self, box: Tuple[int, int, int, int], size: Tuple[int, int], scale: float,
                          mean: np.ndarray, std: np.ndarray, out: np.ndarray, top: int, left: int) -> None:
        """Resize ``box`` to ``size`` (width, height), normalize, write into ``out`` at (top, left).

        All of ``out`` (3, H, W) is written: what lies around the resized pixels becomes 0.
        """
        x0, y0, x1, y1 = box
        out_width, out_height = size
        v_first = vertical_first(x1 - x0, y1 - y0, out_width, out_height)
        if not v_first and self._columns is None:
            self._columns = self._read_only(_interleaved_columns(self._rows))
        columns = self._columns if self._columns is not None else _NO_PIXELS
        _resize(self._rows, columns, np.asarray(box, np.int64), out_width, out_height, v_first,
                scale, mean, std, out, top, left)
