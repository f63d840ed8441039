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
first, so that both inner loops run over contiguous memory. The whole image and its crops
read the same rows, so they are resized in one sweep down the image: each band of rows is
transposed once for all of them, and each output row is finished as soon as the rows it
reads are ready, while they are still in cache. The last pass writes normalized floats
straight into the planar model input, padding included. Pixels move 4 bytes at a time (see
``SPARE``).
"""

from __future__ import annotations

import math
import os
from typing import Sequence, Tuple

import nanoarrow
import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from PIL import Image

PRECISION_BITS = 22  # Pillow's 32 - 8 - 2 for 8-bit images
_HALF = 1 << (PRECISION_BITS - 1)
_ONE = float(1 << PRECISION_BITS)
CHANNELS = 3
PIXEL = 4  # bytes per source pixel: R, G, B, unused
STRIP_BYTES = 1 << 20  # rows copied at a time out of an image Pillow holds in several blocks
_TILE = 64  # rows per band of the horizontal pass (a band of a 4000 px wide image: 768 KB, in L2)


def prefer_wide_vectors() -> None:
    """Let numba vectorize with 512-bit registers on CPUs that have them (process-wide).

    LLVM keeps to 256-bit vectors on Intel's AVX-512 cores unless told otherwise (its
    ``prefer-256-bit`` tuning, chosen against the clock drop wide vectors caused on the first
    of them). This module's loops widen bytes and multiply-add integers, and twice the lanes
    per instruction made preprocessing 1.10-1.18x faster on the benchmark machine (a 2-core
    Xeon, Emerald Rapids; docs/performance.md); the bytes are the same, integer sums being
    exact. It only takes effect before numba compiles or loads its first function in the
    process, so this module calls it when imported. Nothing changes where the CPU has no
    AVX-512 or ``NUMBA_CPU_FEATURES`` is set: the user's choice wins.
    """
    if numba.config.CPU_FEATURES is not None or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        numba.config.CPU_FEATURES = features + ",-prefer-256-bit"


prefer_wide_vectors()


# Pixels move 4 bytes at a time, the bytes as they lie: a 3-byte pixel is written together with
# the byte after it, which the next pixel's write then overwrites. Every row the horizontal pass
# writes into ends with one spare byte for the last pixel's fourth (numba has no unaligned 3-byte
# move, and three byte moves per pixel took about a third of the horizontal pass).
SPARE = 1


@njit(cache=True, nogil=True)
def _row_bytes(pixels: int) -> int:
    """Bytes of a row of ``pixels`` 3-byte pixels written 4 bytes at a time."""
    return pixels * CHANNELS + SPARE


@intrinsic
def _load4(typingctx, data, index):
    """The 4 bytes at ``data[index:index + 4]`` as one uint32, at any alignment, unchecked."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        at = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(32).as_pointer())
        return builder.load(at, align=1)
    return types.uint32(data, index), codegen


@intrinsic
def _store4(typingctx, data, index, value):
    """``value``'s 4 bytes into ``data[index:index + 4]``, at any alignment, unchecked."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        at = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(32).as_pointer())
        builder.store(args[2], at, align=1)
        return context.get_dummy_value()
    return types.void(data, index, types.uint32), codegen


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
def _span(bounds: np.ndarray) -> Tuple[int, int]:
    """First input index any output reads, and one past the last."""
    first = bounds[0, 0]
    last = first + bounds[0, 1]
    for o in range(1, bounds.shape[0]):
        first = min(first, bounds[o, 0])
        last = max(last, bounds[o, 0] + bounds[o, 1])
    return first, last


@njit(cache=True, nogil=True)
def _across_band(src: np.ndarray, row0: int, count: int, taps: np.ndarray, bounds: np.ndarray,
                 first: int, last: int, band: np.ndarray, acc: np.ndarray, result: np.ndarray, out: np.ndarray,
                 where: np.ndarray) -> None:
    """The horizontal pass over ``src[row0:row0 + count]`` (at most ``_TILE`` rows), reading
    pixel columns ``first`` to ``last``.

    ``src`` holds 4 bytes per pixel (R, G, B, unused). Output ``o`` of the band's row ``r`` goes
    to its 3 bytes at ``out[where[o, 0] + r * where[o, 1]]`` in the flat ``out``: outputs of
    several boxes can share one band, each written into rows of its own width, each row with
    a spare byte at its end (``_row_bytes``); ``band`` and ``result`` rows too. The band's
    pixels are transposed into ``band``, which stays in cache, so the multiply-adds run along
    contiguous memory (across the band's rows) and vectorize, and each result goes straight
    back into row order: no transposed copy of the image is ever made.
    """
    # Indices are unsigned wherever numba cannot prove them non-negative: it then skips its
    # negative-index check on every byte moved (5-10 % of this pass).
    width = count * CHANNELS
    top = np.uint64(row0)
    for col in range(first, last):
        dst = band[col - first]
        x = np.uint64(col * PIXEL)
        for r in range(count):
            _store4(dst, np.uint64(r * CHANNELS), _load4(src[top + np.uint64(r)], x))
    for o in range(taps.shape[0]):
        _accumulate(acc, band, bounds[o, 0] - first, 0, width, taps[o], bounds[o, 1])
        for j in range(width):
            result[j] = _byte(acc[j])
        step = np.uint64(where[o, 1])  # a local: a store into ``out`` could alias ``where`` for LLVM
        at = np.uint64(where[o, 0])
        for r in range(count):
            _store4(out, at, _load4(result, np.uint64(r * CHANNELS)))
            at += step


@njit(cache=True, nogil=True)
def _resample_across(src: np.ndarray, nrows: int, taps: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The horizontal pass over the first ``nrows`` rows of ``src``, band by band."""
    first, last = _span(bounds)
    out_len = taps.shape[0]
    stride = _row_bytes(out_len)
    out = np.empty(nrows * stride, np.uint8)
    where = np.empty((out_len, 2), np.int64)
    for o in range(out_len):
        where[o, 0] = o * CHANNELS
        where[o, 1] = stride
    band = np.empty((last - first, _row_bytes(_TILE)), np.uint8)
    acc = np.empty(_TILE * CHANNELS, np.int32)
    result = np.empty(_row_bytes(_TILE), np.uint8)
    for r0 in range(0, nrows, _TILE):
        _across_band(src, r0, min(_TILE, nrows - r0), taps, bounds, first, last, band, acc, result,
                     out[r0 * stride:], where)
    return out.reshape(nrows, stride)


@njit(cache=True, nogil=True)
def _pad(out: np.ndarray, top: int, left: int, width: int, height: int) -> None:
    """Zeros around the resized pixels: the original pads in normalized space."""
    out[:, :top, :] = 0.0
    out[:, top + height:, :] = 0.0
    out[:, top: top + height, :left] = 0.0
    out[:, top: top + height, left + width:] = 0.0


@njit(cache=True, nogil=True)
def _resample_rows_normalized(src: np.ndarray, row_shift: int, width: int, taps: np.ndarray,
                              bounds: np.ndarray, start: int, stop: int, scale: float, mean: np.ndarray,
                              std: np.ndarray, out: np.ndarray, top: int, left: int) -> None:
    """Rows ``start`` to ``stop`` of the last pass, along the rows of ``src`` (``width`` pixels)
    (input index i is row i + row_shift), written as normalized floats into ``out`` (3, H, W),
    one plane per channel, at (top, left).

    The arithmetic is the reference's: float64 rescale, then float32 subtract and divide.
    """
    acc = np.empty(width * CHANNELS, np.int32)
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = std[0], std[1], std[2]
    for o in range(start, stop):
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
def _sweep(rows: np.ndarray, boxes: np.ndarray, sizes: np.ndarray, places: np.ndarray, groups: np.ndarray,
           group_taps, group_bounds, group_boxes, scale: float, mean: np.ndarray, std: np.ndarray,
           out: np.ndarray) -> None:
    """Boxes resized horizontal pass first, in one sweep down the image.

    ``groups`` are consecutive ranges of pixel rows, each with one horizontal table: the
    outputs of the boxes ``group_boxes[g]`` that read those rows, side by side. Each band of
    rows is transposed once for all of them. After each band, every output row whose input
    rows are complete is finished; each box keeps only the intermediate rows its unfinished
    output rows still need, in a window that slides down with the sweep, so they are written
    and read while in cache (keeping all of them, 6.6 MB for a 1920x1080 photo at
    max_partition 9, cost more than the shared transposes saved).
    """
    n = boxes.shape[0]
    swept = np.zeros(n, np.bool_)
    base = np.full(n, rows.shape[0], np.int64)  # image row held in each window's first row
    for g in range(groups.shape[0]):
        for b in group_boxes[g]:
            swept[b] = True
            base[b] = min(base[b], groups[g, 0])
    v_taps = []
    v_bounds = []
    window = np.zeros(n, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    for b in range(n):
        taps, bounds = coefficients(boxes[b, 3] - boxes[b, 1], sizes[b, 1])
        v_taps.append(taps)
        v_bounds.append(bounds)
        if swept[b]:
            _pad(out[b], places[b, 0], places[b, 1], sizes[b, 0], sizes[b, 1])
            window[b] = _TILE + 2 * taps.shape[1]  # a band and the rows before it still needed
        offsets[b + 1] = offsets[b] + window[b] * _row_bytes(sizes[b, 0])
    stage = np.empty(offsets[n], np.uint8)
    # Each box's window as rows of its intermediate pixels.
    windows = [stage[offsets[b]: offsets[b + 1]].reshape(window[b], _row_bytes(sizes[b, 0])) for b in range(n)]
    wheres = []
    spans = np.empty((groups.shape[0], 2), np.int64)  # pixel columns each group's table reads
    for g in range(groups.shape[0]):
        spans[g, 0], spans[g, 1] = _span(group_bounds[g])
        wheres.append(np.empty((group_taps[g].shape[0], 2), np.int64))
    band = np.empty((np.max(spans[:, 1] - spans[:, 0]), _row_bytes(_TILE)), np.uint8)
    acc = np.empty(_TILE * CHANNELS, np.int32)
    result = np.empty(_row_bytes(_TILE), np.uint8)
    finished = np.zeros(n, np.int64)  # output rows of each box written so far
    for g in range(groups.shape[0]):
        first, last = spans[g, 0], spans[g, 1]
        where = wheres[g]
        for r0 in range(groups[g, 0], groups[g, 1], _TILE):
            count = min(_TILE, groups[g, 1] - r0)
            o = 0
            for b in group_boxes[g]:
                held = windows[b]
                stride = held.shape[1]
                if r0 + count - base[b] > window[b]:  # slide: keep the rows still needed at the top
                    keep = r0
                    if finished[b] < sizes[b, 1]:
                        # A later output row can start up to a filter width before this one:
                        # dropping zero taps moves starts, the untrimmed starts only grow.
                        ksize = v_taps[b].shape[1]
                        keep = min(r0, max(base[b], boxes[b, 1] + v_bounds[b][finished[b], 0] - ksize))
                    if r0 + count - keep > window[b]:
                        raise RuntimeError("resample: intermediate rows outgrew their window")
                    for y in range(keep, r0):
                        held[y - keep] = held[y - base[b]]
                    base[b] = keep
                at = offsets[b] + (r0 - base[b]) * stride
                for x in range(sizes[b, 0]):
                    where[o, 0] = at + x * CHANNELS
                    where[o, 1] = stride
                    o += 1
            _across_band(rows, r0, count, group_taps[g], group_bounds[g], first, last, band, acc, result, stage, where)
            ready = r0 + count
            for b in group_boxes[g]:
                bounds = v_bounds[b]
                stop = finished[b]
                while stop < sizes[b, 1] and boxes[b, 1] + bounds[stop, 0] + bounds[stop, 1] <= ready:
                    stop += 1
                if stop > finished[b]:
                    _resample_rows_normalized(windows[b], boxes[b, 1] - base[b], sizes[b, 0], v_taps[b], bounds,
                                              finished[b], stop, scale, mean, std, out[b], places[b, 0], places[b, 1])
                    finished[b] = stop
    for b in range(n):
        if swept[b] and finished[b] != sizes[b, 1]:
            raise RuntimeError("resample: a box's rows lie outside the rows swept")


@njit(cache=True, nogil=True)
def _shifted(taps: np.ndarray, bounds: np.ndarray, shift: int, ksize: int) -> Tuple[np.ndarray, np.ndarray]:
    """A box's horizontal table in image columns, ``ksize`` taps wide."""
    wide = np.zeros((taps.shape[0], ksize), np.int32)
    wide[:, : taps.shape[1]] = taps
    moved = bounds.copy()
    moved[:, 0] += shift
    return wide, moved


@njit(cache=True, nogil=True)
def _resize(rows: np.ndarray, boxes: np.ndarray, sizes: np.ndarray, places: np.ndarray, b: int, scale: float,
            mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> None:
    """Box ``b`` alone."""
    x0, y0, x1, y1 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
    out_width, out_height = sizes[b, 0], sizes[b, 1]
    top, left = places[b, 0], places[b, 1]
    h_taps, h_bounds = coefficients(x1 - x0, out_width)
    v_taps, v_bounds = coefficients(y1 - y0, out_height)
    # An axis that keeps its size still gets a pass: its one tap is then 1.0 in fixed point,
    # which gives back every byte, as Pillow's skipped pass would.
    if vertical_first(x1 - x0, y1 - y0, out_width, out_height):
        stage = _resample_rows(rows, y0, x0 * PIXEL, (x1 - x0) * PIXEL, v_taps, v_bounds)
        stage = _resample_across(stage, out_height, h_taps, h_bounds)
        same_taps, same_bounds = coefficients(out_height, out_height)
        _pad(out[b], top, left, out_width, out_height)
        _resample_rows_normalized(stage, 0, out_width, same_taps, same_bounds, 0, out_height, scale, mean, std,
                                  out[b], top, left)
        return
    # Horizontal first, only over the rows the vertical pass reads.
    first, last = _span(v_bounds)
    taps, bounds = _shifted(h_taps, h_bounds, x0, h_taps.shape[1])
    _sweep(rows, boxes[b: b + 1], sizes[b: b + 1], places[b: b + 1], np.array([[y0 + first, y0 + last]]),
           [taps], [bounds], [np.zeros(1, np.int64)], scale, mean, std, out[b: b + 1])


@njit(cache=True, nogil=True)
def _grid_rows(boxes: np.ndarray, columns: int, width: int, height: int) -> int:
    """Rows of the crop grid when ``boxes`` are the whole image and then its crops, row by row,
    each row of crops sharing its rows of pixels and the rows tiling the image; else 0."""
    n = boxes.shape[0]
    if n < 2 or columns < 1 or (n - 1) % columns != 0:
        return 0
    if boxes[0, 0] != 0 or boxes[0, 1] != 0 or boxes[0, 2] != width or boxes[0, 3] != height:
        return 0
    grid_rows = (n - 1) // columns
    y = 0
    for g in range(grid_rows):
        for b in range(1 + g * columns, 1 + (g + 1) * columns):
            if boxes[b, 1] != y or boxes[b, 3] != boxes[1 + g * columns, 3]:
                return 0
        y = boxes[1 + g * columns, 3]
    return grid_rows if y == height else 0


@njit(cache=True, nogil=True)
def _resize_boxes(rows: np.ndarray, boxes: np.ndarray, sizes: np.ndarray, places: np.ndarray, columns: int,
                  scale: float, mean: np.ndarray, std: np.ndarray, out: np.ndarray) -> None:
    """Every box resized into ``out[b]``; see ``PixelSource.resize_boxes``."""
    n = boxes.shape[0]
    grid_rows = _grid_rows(boxes, columns, rows.shape[1] // PIXEL, rows.shape[0])
    for b in range(1, n):
        if vertical_first(boxes[b, 2] - boxes[b, 0], boxes[b, 3] - boxes[b, 1], sizes[b, 0], sizes[b, 1]):
            grid_rows = 0
    if grid_rows == 0:
        for b in range(n):
            _resize(rows, boxes, sizes, places, b, scale, mean, std, out)
        return
    # Each row of crops side by side in one table, the whole image too unless it runs the
    # vertical pass first.
    whole = not vertical_first(boxes[0, 2], boxes[0, 3], sizes[0, 0], sizes[0, 1])
    if not whole:
        _resize(rows, boxes, sizes, places, 0, scale, mean, std, out)
    groups = np.empty((grid_rows, 2), np.int64)
    group_taps = []
    group_bounds = []
    group_boxes = []
    for g in range(grid_rows):
        lead = 1 if whole else 0
        members = np.zeros(lead + columns, np.int64)  # box 0, the whole image, first when it takes part
        members[lead:] = np.arange(1 + g * columns, 1 + (g + 1) * columns)
        tables = []
        ksize = 0
        outputs = 0
        for b in members:
            tables.append(coefficients(boxes[b, 2] - boxes[b, 0], sizes[b, 0]))
            ksize = max(ksize, tables[-1][0].shape[1])
            outputs += sizes[b, 0]
        taps = np.empty((outputs, ksize), np.int32)
        bounds = np.empty((outputs, 2), np.int64)
        o = 0
        for i in range(len(tables)):
            b = members[i]
            wide, moved = _shifted(tables[i][0], tables[i][1], boxes[b, 0], ksize)
            taps[o: o + sizes[b, 0]] = wide
            bounds[o: o + sizes[b, 0]] = moved
            o += sizes[b, 0]
        group_taps.append(taps)
        group_bounds.append(bounds)
        group_boxes.append(members)
        groups[g, 0] = boxes[1 + g * columns, 1]
        groups[g, 1] = boxes[1 + g * columns, 3]
    _sweep(rows, boxes, sizes, places, groups, group_taps, group_bounds, group_boxes, scale, mean, std, out)


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
    whole preprocessing). Images split over several of Pillow's allocation blocks (16 MB
    unless ``PILLOW_BLOCK_SIZE`` or ``hold_whole_images`` says otherwise) are copied.
    """
    try:
        data = _exported(image)
    except ValueError:  # Pillow refuses to export rows that are not in one block
        data = _copied(image)
    rows = data.reshape(image.height, image.width * PIXEL)
    rows.setflags(write=False)  # numba types read-only arrays apart: keep one signature
    return rows


def hold_whole_images(max_pixels: int) -> None:
    """Let Pillow keep every image of up to ``max_pixels`` in one memory block (process-wide).

    Pillow splits an image over 16 MB blocks by default, and a split image cannot be exported:
    a 12-megapixel photo's rows are then copied strip by strip first (16-20 ms here, and 48 MB
    more memory at once). Pillow sizes each block to what the image needs, so a larger limit
    costs nothing for smaller images. The model process calls this once: it decodes every
    image of every request.
    """
    page = 4096  # Pillow wants whole pages, and keeps the size in a C int
    needed = min(-(-max_pixels * PIXEL // page) * page, (2**31 - 1) // page * page)
    if needed > Image.core.get_block_size():
        Image.core.set_block_size(needed)


class PixelSource:
    """One decoded RGB image, ready to resize any of its boxes.

    Its pixel rows are shared by the whole image and its crops.
    """

    def __init__(self, image: Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        self._rows = pixel_rows(image)

    def resize_boxes(self, boxes: Sequence[Tuple[int, int, int, int]], sizes: Sequence[Tuple[int, int]],
                     places: Sequence[Tuple[int, int]], columns: int, scale: float, mean: np.ndarray,
                     std: np.ndarray, out: np.ndarray) -> None:
        """Resize each box to its size (width, height), normalize, write into ``out[i]`` at its
        place (top, left); what lies around becomes 0.

        When the boxes are the whole image and then a grid of crops, ``columns`` per row, row
        by row (as Ovis2 cuts them), the whole image and each row of crops share one horizontal
        pass over their rows of pixels; the bytes are the same as resizing each box alone.
        """
        _resize_boxes(self._rows, np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(sizes, np.int64).reshape(-1, 2),
                      np.asarray(places, np.int64).reshape(-1, 2), columns, scale, mean, std, out)
