"""Reuse across requests: visual embeddings of images seen before, KV caches of prompts seen before.

Chat clients send the whole conversation on every turn, images included, so turn N's prompt
starts with turn N-1's prompt and answer. Two stores, sharing one byte budget and evicted
least recently used first, keep that work:

* visual embeddings by :func:`image_key`, a digest of the exact pixel values the vision tower
  would read (so the decoded pixels, the crop grid chosen by ``max_partition`` and the
  preprocessing are all in it): an image seen again skips the vision tower;
* KV caches of finished requests (prompt and answer): a prompt whose first tokens equal a
  stored prompt's, with the same images in them, is prefilled from there on only.

Both are exact by construction: the same ids at the same positions with the same image
embeddings give the same keys and values, up to float rounding of a different prefill split.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)


def image_key(pixel_values: torch.Tensor) -> str:
    """A digest of one image's preprocessed crops: equal keys mean equal vision-tower input."""
    values = pixel_values.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(values.shape), str(values.dtype))).encode())
    digest.update(values.numpy().reshape(-1).view("uint8").data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageRef:
    """One image of a prompt: its key, where its tokens are, and its crops."""

    key: str
    start: int
    end: int
    pixel_values: torch.Tensor


@dataclass
class _Prefix:
    ids: List[int]
    images: List[Tuple[int, int, str]]  # (start, end, key) within ids
    cache: Any  # DynamicCache, batch 1, len(ids) columns
    nbytes: int


@dataclass
class ReuseStats:
    vision_hits: int = 0
    vision_misses: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    reused_tokens: int = 0
    evictions: int = 0
    bytes: int = 0


def _cache_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _crop_copy(cache: Any, length: int) -> Any:
    """The first ``length`` columns of a batch-1 cache, as a cache of its own."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), index)
    return copy


def common_prefix(stored_ids: Sequence[int], stored_images: Sequence[Tuple[int, int, str]],
                  ids: Sequence[int], images: Sequence[ImageRef]) -> int:
    """How many leading tokens of ``ids`` a stored prompt's cache can stand for.

    Token ids must match, and every image in that stretch must be the same image at the same
    place (image placeholder ids are the same for every image). The stretch never ends inside
    an image, and leaves at least the last token to prefill (its logits are needed).
    """
    limit = min(len(stored_ids), len(ids) - 1)
    length = 0
    while length < limit and stored_ids[length] == ids[length]:
        length += 1
    stored = {(start, end): key for start, end, key in stored_images}
    for image in images:
        if image.start >= length:
            break
        if image.end > length or stored.get((image.start, image.end)) != image.key:
            return image.start
    return length


class ReuseCache:
    """The two stores, one budget, one lock (the scheduler thread reads, any thread may count)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.stats = ReuseStats()
        self._entries: "collections.OrderedDict[Tuple[str, Any], Any]" = collections.OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.Lock()
        self._next_prefix = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    # --- visual embeddings ---------------------------------------------------------------

    def vision(self, key: str) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._entries.get(("vision", key))
            if value is None:
                self.stats.vision_misses += 1
                return None
            self._entries.move_to_end(("vision", key))
            self.stats.vision_hits += 1
            return value

    def put_vision(self, key: str, features: torch.Tensor) -> None:
        self._put(("vision", key), features, features.numel() * features.element_size())

    # --- prompt prefixes -----------------------------------------------------------------

    def longest_prefix(self, ids: Sequence[int], images: Sequence[ImageRef]) -> Tuple[int, Optional[Any]]:
        """(reused length, a private copy of the cache for it), or (0, None)."""
        best, best_key = 0, None
        with self._lock:
            for key, entry in self._entries.items():
                if key[0] != "prefix":
                    continue
                length = common_prefix(entry.ids, entry.images, ids, images)
                if length > best:
                    best, best_key = length, key
            if best_key is None:
                self.stats.prefix_misses += 1
                return 0, None
            self._entries.move_to_end(best_key)
            entry = self._entries[best_key]
            self.stats.prefix_hits += 1
            self.stats.reused_tokens += best
            return best, _crop_copy(entry.cache, best)

    def put_prefix(self, ids: List[int], images: Sequence[ImageRef], cache: Any) -> None:
        """Keep a finished request's cache (batch 1, one column per id) for later prompts."""
        spans = [(i.start, i.end, i.key) for i in images if i.end <= len(ids)]
        nbytes = _cache_bytes(cache)
        with self._lock:
            for key, entry in list(self._entries.items()):  # a stored prompt this one extends adds nothing
                if key[0] == "prefix" and len(entry.ids) <= len(ids) and ids[:len(entry.ids)] == entry.ids \
                        and all(s in spans for s in entry.images):
                    self._drop(key)
            self._next_prefix += 1
            key = ("prefix", self._next_prefix)
        self._put(key, _Prefix(ids, spans, cache, nbytes), nbytes)

    # --- budget --------------------------------------------------------------------------

    def _drop(self, key: Tuple[str, Any]) -> None:
        del self._entries[key]
        self.stats.bytes -= self._sizes.pop(key)

    def _put(self, key: Tuple[str, Any], value: Any, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self._entries and self.stats.bytes + nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self.stats.evictions += 1
            self._entries[key] = value
            self._sizes[key] = nbytes
            self.stats.bytes += nbytes
        logger.debug("reuse cache: %s", self.stats)


def default_reuse_budget(device: torch.device) -> int:
    """Bytes for reuse when the launch does not say: a tenth of free GPU memory, 2 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.1)
    return 2 << 30
