"""Continuous batching: concurrent requests share the model's decode steps.

One scheduler thread owns the model. A request is prefilled alone (with its images, keeping
only the last position's logits), then its KV cache joins the running batch at the next step
boundary; every step decodes one token for each row at once. A request that arrives during a
step does not wait for it: the step stops at the next decoder layer, its cache columns are
dropped, the newcomer is prefilled, and the step runs again with it (at most once per step, so
the rows already decoding always progress). A row leaves the batch as soon
as it finishes (eos, ``max_tokens``) or its consumer stops reading (a stop string found, a
client gone), and its memory goes with it.

A long prefill (an image through the vision tower takes seconds on a CPU) does not stop the
running rows for its whole length: it runs in a greenlet on the scheduler's thread, and at a
vision-encoder or decoder layer, once it has run ``prefill_slice`` seconds since the last decode
step, it hands the thread back for one decode step of the batch, then goes on where it stopped.
A greenlet, not a thread: the pause needs no lock, and no second thread gets an OpenMP team (see
Threads). Each greenlet has its own ``contextvars`` context, so transformers' output capture of
the paused forward and of the decode step stay apart. A prefill whose consumer has gone stops at
its next layer.

Rows of different lengths share one cache by left padding: each row's keys and values end at
the last column, the columns before its own start are masked out, and its positions count
its own tokens only, so a row computes what it would alone (up to float rounding of batched
matrix products). Sampling is per row: its own processors (repetition penalty over its own
ids, temperature, top-k, top-p, in the order transformers' ``generate`` applies them) and, with
a ``seed``, its own random generator, so a seeded request gets the same text alone and in any
batch.

Bounds: at most ``max_num_seqs`` rows decode together, and a row is admitted only while the
batch's padded cache at its longest (each row's prompt plus ``max_tokens``) fits the KV budget;
the others wait in arrival order. ``max_num_seqs=1`` runs one request at a time.

Threads: the scheduler thread does every tensor operation big enough for torch to spread over
its OpenMP threads, pixel values' cast to the vision tower's dtype included. libgomp spins
briefly, instead of sleeping, at the barriers of a parallel region only while it manages no
more threads than there are cores; one more thread keeping an OpenMP team of its own (a
request thread of Xinference's pool that once cast an image, say) makes its threads sleep at
every barrier, and on 2 cores a decode step then runs at about 0.9x its speed (``docs/architecture.md``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import greenlet
import torch

from .generation import SamplingPlan
from .reuse import ImageRef, ReuseCache

logger = logging.getLogger(__name__)

_END = None


class _Preempted(BaseException):
    """Raised at a decoder layer of a decode step when a waiting request should be prefilled first.

    A ``BaseException``, so no ``except Exception`` on the way out of the forward swallows it."""


class _Abandoned(BaseException):
    """Raised at a layer of a prefill whose consumer has stopped reading: its work is wasted."""


@dataclass
class TokenLogprob:
    """What ``logprobs`` reports for one generated token, from the model's own distribution."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


@dataclass
class RowOptions:
    """Per-request extras: a grammar to follow, and logprobs to record (``top`` alternatives each)."""

    grammar: Any = None  # structured.RowGrammar
    top_logprobs: Optional[int] = None  # None: no logprobs; 0: the sampled token's only
    logprobs: List[TokenLogprob] = field(default_factory=list)  # filled before each token is handed out


class _Row:
    """One request in the scheduler: its inputs, its sampling state and its outbox."""

    def __init__(self, inputs: Dict[str, Any], plan: SamplingPlan, device: torch.device,
                 images: Sequence[ImageRef] = (), options: Optional[RowOptions] = None):
        self.inputs = inputs
        self.images = list(images)
        self.plan = plan
        self.options = options or RowOptions()
        self.grammar = self.options.grammar
        kwargs = plan.generate_kwargs
        self.eos = set(kwargs.get("eos_token_id") or [])
        self.max_new = int(plan.max_new_tokens)
        self.min_new = int(kwargs.get("min_new_tokens") or 0)
        self.prompt_len = int(inputs["input_ids"].shape[1])
        self.history = inputs["input_ids"][0].clone()  # what the repetition penalty sees
        self.processors = _processors(kwargs)
        self.do_sample = bool(kwargs.get("do_sample"))
        self.generator: Optional[torch.Generator] = None
        if plan.seed is not None and self.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(plan.seed)
        self.produced = 0
        self.position = self.prompt_len  # the next token's position among this row's own tokens
        self.last_token: Optional[int] = None
        self.outbox: "queue.Queue[Union[int, BaseException, None]]" = queue.Queue()
        self.notify: Optional[Callable[[], None]] = None  # wakes an asynchronous consumer
        self.cancelled = threading.Event()

    def send(self, item: Union[int, BaseException, None]) -> None:
        """Hand a token, an error or the end to the consumer."""
        self.outbox.put(item)
        notify = self.notify  # read once: the consumer clears it when it leaves
        if notify is not None:
            try:
                notify()
            except RuntimeError:  # its event loop has closed: nobody is reading any more
                self.cancelled.set()

    @property
    def peak_tokens(self) -> int:
        return self.prompt_len + self.max_new

    @property
    def plain_greedy(self) -> bool:
        """Whether the next token is just the argmax of the logits (one batched op for such rows)."""
        plan = self.plan
        return not (self.do_sample or self.grammar is not None or len(self.processors) or plan.frequency_penalty
                    or plan.presence_penalty or self.options.top_logprobs is not None
                    or (self.produced < self.min_new and self.eos))

    def take(self, value: int) -> int:
        """Record ``value`` as this row's next token."""
        self.history = torch.cat([self.history, self.history.new_tensor([value])])
        self.produced += 1
        self.last_token = value
        return value

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's last-position logits (a 1-D float tensor)."""
        raw = logits.float().unsqueeze(0)
        scores = self.grammar.mask(raw) if self.grammar is not None else raw.clone()
        if self.produced < self.min_new and self.eos:
            scores[:, list(self.eos)] = float("-inf")
        plan = self.plan
        if self.produced and (plan.frequency_penalty or plan.presence_penalty):
            answer = self.history[self.prompt_len:].to(scores.device)
            counts = torch.zeros_like(scores[0]).index_add_(0, answer, torch.ones_like(answer, dtype=scores.dtype))
            scores = scores - plan.frequency_penalty * counts - plan.presence_penalty * (counts > 0).to(scores.dtype)
        scores = self.processors(self.history.unsqueeze(0).to(scores.device), scores)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        value = int(token.item())
        if self.grammar is not None:
            self.grammar.accept(value)
        if self.options.top_logprobs is not None:
            self._record(raw[0], value)
        return self.take(value)

    def _record(self, logits: torch.Tensor, token: int) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        top: List[Tuple[int, float]] = []
        if self.options.top_logprobs:
            values, ids = logprobs.topk(self.options.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        self.options.logprobs.append(TokenLogprob(token, float(logprobs[token]), top))

    def finished(self, token: int) -> bool:
        done = token in self.eos or self.produced >= self.max_new
        return done or (self.grammar is not None and self.grammar.finished)


def _processors(kwargs: Dict[str, Any]):
    """The logits processors ``generate`` would build for these settings, in its order."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    penalty = kwargs.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=float(penalty)))
    if kwargs.get("do_sample"):
        temperature = kwargs.get("temperature")
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        top_k = kwargs.get("top_k")
        if top_k:
            processors.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
        top_p = kwargs.get("top_p")
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
    return processors


class KVBatch:
    """The running batch's cache: one ``DynamicCache``, rows left-padded to a common length."""

    def __init__(self):
        self.cache: Any = None
        self.pads: List[int] = []  # left padding of each row, in columns

    @property
    def size(self) -> int:
        return len(self.pads)

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def add(self, cache: Any) -> None:
        """Append one prefilled row's cache (batch of 1, no padding) as the last row."""
        new_len = int(cache.get_seq_length())
        if self.cache is None:
            self.cache, self.pads = cache, [0]
            return
        old_len = self.length
        total = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, total), _pad_left(theirs.keys.to(mine.keys.device), total)])
            mine.values = torch.cat(
                [_pad_left(mine.values, total), _pad_left(theirs.values.to(mine.values.device), total)]
            )
        self.pads = [p + total - old_len for p in self.pads] + [total - new_len]

    def truncate(self, length: int) -> None:
        """Drop the columns past ``length`` that an interrupted step wrote into some layers."""
        for layer in self.cache.layers:
            if layer.keys.shape[2] > length:
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]

    def keep(self, rows: List[int]) -> None:
        """Keep only these rows (in this order) and drop the padding no row needs any more."""
        if not rows:
            self.cache, self.pads = None, []
            return
        if rows != list(range(self.size)):
            for layer in self.cache.layers:
                index = torch.tensor(rows, device=layer.keys.device)
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self.pads = [self.pads[i] for i in rows]
        common = min(self.pads)
        if common:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, common:]
                layer.values = layer.values[:, :, common:]
            self.pads = [p - common for p in self.pads]

    def row_cache(self, row: int) -> Any:
        """One row's keys and values without its padding, as a batch-1 cache of its own."""
        from transformers import DynamicCache

        pad = self.pads[row]
        cache = DynamicCache()
        for index, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[row:row + 1, :, pad:].clone(), layer.values[row:row + 1, :, pad:].clone(), index)
        return cache

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """Mask over the cached columns plus the one being decoded."""
        length = self.length + 1
        columns = torch.arange(length, device=device).unsqueeze(0)
        return (columns >= torch.tensor(self.pads, device=device).unsqueeze(1)).long()


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=2)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


@dataclass
class SchedulerStats:
    """Counters for the log and tests: how batched the work actually was."""

    steps: int = 0
    rows_decoded: int = 0
    prefills: int = 0
    max_batch: int = 0
    waits_for_budget: int = 0
    preemptions: int = 0  # decode steps stopped part-way so that a newcomer is prefilled first
    steps_in_prefills: int = 0  # decode steps run while a long prefill paused
    abandoned_prefills: int = 0  # prefills stopped at a layer because their consumer had gone
    sizes: Dict[int, int] = field(default_factory=dict)


class BatchScheduler:
    """Runs every generation of one model, batching their decode steps."""

    def __init__(self, model: Any, max_num_seqs: int, kv_budget_bytes: int, bytes_per_token: int,
                 reuse: Optional[ReuseCache] = None, name: str = "ovis2-batch",
                 prefill_slice: Optional[float] = None, compute_threads: Optional[Callable[[], int]] = None):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be at least 1, got {max_num_seqs}")
        if prefill_slice is not None and prefill_slice < 0:
            raise ValueError(f"prefill_slice: must be 0 s or more (None: a prefill never pauses), got {prefill_slice}")
        self.prefill_slice = prefill_slice
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv_budget_bytes = kv_budget_bytes
        self.bytes_per_token = bytes_per_token
        self.stats = SchedulerStats()
        self.reuse = reuse if reuse is not None and reuse.enabled else None
        self._indicators: Optional[torch.Tensor] = None
        self._waiting: Deque[_Row] = collections.deque()
        self._admitted: List[_Row] = []  # out of the waiting line, not yet in the batch
        self._active: List[_Row] = []
        self._batch = KVBatch()
        self._wake = threading.Condition()
        self._closed = False
        self._device = model.get_input_embeddings().weight.device
        self._pixels = _vision_placement(model)
        self._preemptible = False  # true while a decode step may be stopped for a newcomer
        self._redo = False  # the step now due reruns one that was stopped: it runs to its end
        self._prefill_task: Optional[greenlet.greenlet] = None  # the prefill under way, paused or running
        self._prefilling: Optional[_Row] = None
        self._slice_start = 0.0
        self._compute_threads = compute_threads
        self._threads = 0  # torch threads this thread computes with, set at its first step
        layers = _decoder_layers(model) + _vision_layers(model)
        self._hooks = [layer.register_forward_pre_hook(self._at_layer) for layer in layers]
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the consumer side -------------------------------------------------------------

    def submit(self, inputs: Dict[str, Any], plan: SamplingPlan, images: Sequence[ImageRef] = (),
               options: Optional[RowOptions] = None) -> Iterator[List[int]]:
        """Yield the token ids generated since the last pull; closing the iterator ends the row.

        ``images`` (one per image of the prompt, in order) lets the prefill reuse what earlier
        requests computed; without reuse they are not needed. ``options`` adds a grammar or
        logprobs to this row. The iterator blocks its thread while it waits: :meth:`submit_async`
        waits on an event loop instead.
        """
        return self._drain(self._enqueue(inputs, plan, images, options))

    def submit_async(self, inputs: Dict[str, Any], plan: SamplingPlan, images: Sequence[ImageRef] = (),
                     options: Optional[RowOptions] = None) -> AsyncIterator[List[int]]:
        """:meth:`submit` for a consumer on an event loop: waiting for tokens holds no thread."""
        return self._drain_async(self._enqueue(inputs, plan, images, options))

    def _enqueue(self, inputs: Dict[str, Any], plan: SamplingPlan, images: Sequence[ImageRef],
                 options: Optional[RowOptions]) -> _Row:
        row = _Row(inputs, plan, self._device, images, options)
        with self._wake:
            if self._closed:
                raise RuntimeError("the model's scheduler has stopped")
            self._waiting.append(row)
            self._wake.notify_all()
        return row

    @staticmethod
    def _ready(row: _Row, item: Union[int, BaseException, None]) -> Tuple[List[int], bool]:
        """``item`` and every token already in the outbox after it; whether the row has ended."""
        batch: List[int] = []
        while True:
            if item is _END:
                return batch, True
            if isinstance(item, BaseException):
                raise item
            batch.append(item)
            try:
                item = row.outbox.get_nowait()
            except queue.Empty:
                return batch, False

    def _drain(self, row: _Row) -> Iterator[List[int]]:
        done = False
        try:
            while not done:
                batch, done = self._ready(row, row.outbox.get())
                if batch:
                    yield batch
        finally:
            if not done:
                self._cancel(row)

    async def _drain_async(self, row: _Row) -> AsyncIterator[List[int]]:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        row.notify = lambda: loop.call_soon_threadsafe(arrived.set)
        done = False
        try:
            while not done:
                try:
                    item = row.outbox.get_nowait()
                except queue.Empty:
                    arrived.clear()
                    if row.outbox.empty():  # a token sent after this check sets the event again
                        await arrived.wait()
                    continue
                batch, done = self._ready(row, item)
                if batch:
                    yield batch
        finally:
            row.notify = None
            if not done:
                self._cancel(row)

    def _cancel(self, row: _Row) -> None:
        row.cancelled.set()
        with self._wake:
            self._wake.notify_all()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=60)
        for hook in self._hooks:
            hook.remove()

    @property
    def busy(self) -> bool:
        """Whether any request has not ended yet (waiting, being prefilled, or decoding)."""
        with self._wake:
            return bool(self._active or self._waiting or self._admitted)

    # --- the scheduler thread ----------------------------------------------------------

    def _fits(self, row: _Row) -> bool:
        if not self._active:
            return True  # one row always runs, whatever the budget
        rows = len(self._active) + 1
        longest = max([r.peak_tokens for r in self._active] + [row.peak_tokens])
        return rows * longest * self.bytes_per_token <= self.kv_budget_bytes

    def _at_layer(self, module: Any, args: Any) -> None:
        if greenlet.getcurrent() is self._prefill_task:
            self._pause_prefill()
        else:
            self._preempt_for_newcomer()

    def _pause_prefill(self) -> None:
        """In a prefill: give way to one decode step once this slice is used up, or stop if unwanted."""
        row = self._prefilling
        if row.cancelled.is_set():
            raise _Abandoned
        if self.prefill_slice is None or not self._active:
            return
        if time.perf_counter() - self._slice_start < self.prefill_slice:
            return
        self._prefill_task.parent.switch()
        if row.cancelled.is_set():
            raise _Abandoned

    def _preempt_for_newcomer(self) -> None:
        """Stop the running decode step if the first waiting request would be admitted now.

        Only the scheduler thread pops the waiting line, so its head is safe to read here."""
        if not self._preemptible or not self._waiting or len(self._active) >= self.max_num_seqs:
            return
        head = self._waiting[0]
        if not head.cancelled.is_set() and self._fits(head):
            raise _Preempted

    def _admissions(self) -> List[_Row]:
        """Rows to prefill now, in arrival order; cancelled waiters leave the line."""
        admitted: List[_Row] = []
        with self._wake:
            while True:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft().send(_END)
                if not self._waiting and not self._active and not admitted:
                    if self._closed:
                        return []
                    self._wake.wait()
                    continue
                break
            while self._waiting and len(self._active) + len(admitted) < self.max_num_seqs:
                row = self._waiting[0]
                if row.cancelled.is_set():
                    self._waiting.popleft().send(_END)
                    continue
                if admitted or not self._fits(row):
                    if not admitted and self._active:
                        self.stats.waits_for_budget += 1
                    break
                admitted.append(self._waiting.popleft())
            self._admitted = list(admitted)
        return admitted

    def _run(self) -> None:
        with torch.inference_mode():  # the cache, logits and sampling state are inference tensors
            self._loop()

    def _loop(self) -> None:
        while True:
            admitted = self._admissions()
            if not admitted and not self._active:
                if self._closed:
                    return
                continue
            for row in admitted:
                self._prefill(row)
            with self._wake:
                self._admitted = []
            if self._active:
                self._step()

    def _fit_threads(self) -> None:
        """Compute with the cores no other work of this process holds (``compute_threads``).

        An OpenMP team with more threads than free cores makes every barrier of every
        operation wait for a thread the OS has given another's turn: a step of small
        operations then runs tens of times slower than with one thread fewer.
        """
        if self._compute_threads is None:
            return
        wanted = max(1, self._compute_threads())
        if wanted != self._threads:
            torch.set_num_threads(wanted)
            self._threads = wanted

    def _prefill(self, row: _Row) -> None:
        """Prefill ``row``, running one decode step of the batch each time the prefill pauses."""
        self._fit_threads()
        task = greenlet.greenlet(self._prefill_row)
        task.gr_context = contextvars.copy_context()
        self._prefill_task, self._prefilling = task, row
        pauses = 0
        try:
            self._slice_start = time.perf_counter()
            task.switch(row)
            while not task.dead:
                pauses += 1
                self._step()
                self._slice_start = time.perf_counter()
                task.switch()
        finally:
            self._prefill_task = self._prefilling = None
        if pauses:
            self.stats.steps_in_prefills += pauses
            logger.info("a prefill paused %d times for a decode step of the batch", pauses)

    def _prefill_row(self, row: _Row) -> None:
        from transformers import DynamicCache

        self.stats.prefills += 1
        try:
            if self.reuse is None:
                inputs = dict(row.inputs)
                if inputs.get("pixel_values") is not None:
                    inputs["pixel_values"] = inputs["pixel_values"].to(*self._pixels)
                out = self.model(**inputs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            else:
                out = self._prefill_reusing(row)
            token = row.choose(out.logits[0, -1])
        except _Abandoned:
            self.stats.abandoned_prefills += 1
            logger.info("prefill stopped: its consumer stopped reading")
            row.send(_END)
            return
        except BaseException as exc:  # this request alone fails
            logger.warning("prefill failed: %s: %s", type(exc).__name__, exc)
            row.send(exc)
            row.send(_END)
            return
        row.inputs = {}  # pixel values and ids are in the cache now
        row.send(token)
        if row.finished(token) or row.cancelled.is_set():
            self._keep_for_reuse(row, out.past_key_values)
            row.send(_END)
            return
        self._batch.add(out.past_key_values)
        self._active.append(row)

    def _prefill_reusing(self, row: _Row) -> Any:
        """Prefill only what no stored prompt covers, with stored visual embeddings where known."""
        from transformers import DynamicCache

        ids = row.inputs["input_ids"]
        length = ids.shape[1]
        start, cache = self.reuse.longest_prefix(ids[0].tolist(), row.images)
        embeds = self._embeddings(ids[:, start:], [i for i in row.images if i.start >= start])
        positions = torch.arange(start, length, device=ids.device).unsqueeze(0)
        mask = torch.ones(1, length, dtype=torch.long, device=ids.device)
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          past_key_values=cache if cache is not None else DynamicCache(), use_cache=True,
                          logits_to_keep=1)

    def _embeddings(self, ids: torch.Tensor, images: List[ImageRef]) -> torch.Tensor:
        """The language model's input embeddings, images scattered in as the native model does."""
        core = self.model.model
        embeds = self.model.get_input_embeddings()(ids)
        features = []
        for image in images:
            found = self.reuse.vision(image.key)
            if found is None:
                pixels = image.pixel_values.to(*self._pixels)
                found = core.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
                self.reuse.put_vision(image.key, found)
            features.append(found.reshape(-1, found.shape[-1]))
        if features:
            where = (ids == self.model.config.image_token_id).to(embeds.device)
            embeds[where] = torch.cat(features).to(embeds.device, embeds.dtype)
        if self._indicators is None:
            count = core.vision_tower.num_visual_indicator_tokens
            table = core.visual_embeddings_table
            indicator_ids = torch.arange(core.visual_vocab_size - count, core.visual_vocab_size, device=table.weight.device)
            self._indicators = table(indicator_ids)
        for index, token_id in enumerate(core.visual_indicator_token_ids):
            where = (ids == token_id).to(embeds.device)
            if where.any():
                embeds[where] = self._indicators[index].to(embeds.device, embeds.dtype)
        return embeds

    def _keep_for_reuse(self, row: _Row, cache: Any) -> None:
        """Store a leaving row's cache: its prompt and the answer tokens fed so far."""
        if self.reuse is not None:
            self.reuse.put_prefix(row.history[:row.position].tolist(), row.images, cache)

    def _step(self) -> None:
        self._fit_threads()
        rows = self._active
        device = self._device
        ids = torch.tensor([[r.last_token] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        mask = self._batch.attention_mask(device)
        length = self._batch.length
        self._preemptible, self._redo = not self._redo and self._prefill_task is None, False
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self._batch.cache, use_cache=True, logits_to_keep=1)
        except _Preempted:  # no row has changed yet: the step runs again after the newcomer's prefill
            self._batch.truncate(length)
            self.stats.preemptions += 1
            self._redo = True
            return
        except BaseException as exc:  # nothing tells which row caused it: all of them end
            logger.exception("decode step over %d rows failed", len(rows))
            for row in rows:
                row.send(exc)
                row.send(_END)
            self._active, self._batch = [], KVBatch()
            return
        finally:
            self._preemptible = False
        self._batch.cache = out.past_key_values
        self.stats.steps += 1
        self.stats.rows_decoded += len(rows)
        if len(rows) > self.stats.max_batch:
            self.stats.max_batch = len(rows)
            logger.info("%d rows decoding together (most so far)", len(rows))
        self.stats.sizes[len(rows)] = self.stats.sizes.get(len(rows), 0) + 1
        keep: List[int] = []
        greedy = [r.plain_greedy for r in rows]
        argmax = out.logits[:, -1].argmax(-1).tolist() if any(greedy) else None
        for index, row in enumerate(rows):
            row.position += 1
            if row.cancelled.is_set():
                self._leave(row, index)
                logger.info("generation stopped after %d tokens: its consumer stopped reading", row.produced)
                continue
            try:
                token = row.take(argmax[index]) if greedy[index] else row.choose(out.logits[index, -1])
            except Exception as exc:  # its grammar or sampling failed: this row alone ends
                logger.warning("a row failed choosing its token: %s: %s", type(exc).__name__, exc)
                row.send(exc)
                row.send(_END)
                continue
            row.send(token)
            if row.finished(token):
                self._leave(row, index)
                continue
            keep.append(index)
        self._active = [rows[i] for i in keep]
        self._batch.keep(keep)

    def _leave(self, row: _Row, index: int) -> None:
        if self.reuse is not None:
            self._keep_for_reuse(row, self._batch.row_cache(index))
        row.send(_END)


def _vision_placement(model: Any) -> Tuple[torch.device, torch.dtype]:
    """Where and in which dtype the vision tower takes its pixel values."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    weight = next(tower.parameters()) if tower is not None else model.get_input_embeddings().weight
    return weight.device, weight.dtype


def _decoder_layers(model: Any) -> List[Any]:
    """The language model's decoder layers, where a decode step can be stopped."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        logger.warning("no decoder layers found on %s: a decode step runs to its end before a newcomer's prefill",
                       type(model).__name__)
        return []
    return list(layers)


def _vision_layers(model: Any) -> List[Any]:
    """The vision encoder's layers, where a long prefill can pause for a decode step."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    layers = getattr(getattr(getattr(tower, "transformer", None), "encoder", None), "layers", None)
    if layers is None:
        logger.warning("no vision encoder layers found on %s: an image's vision pass runs without a pause",
                       type(model).__name__)
        return []
    return list(layers)


def run_in_own_thread(work: Callable[[], None]) -> None:
    """Run ``work`` on a thread that ends with it, so that the OpenMP team torch gives a thread
    that computes goes with it: Xinference calls ``load`` on a thread of its pool that stays,
    and one team left there makes every decode step's threads sleep at each barrier (see the
    module's docstring)."""
    failure: List[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="ovis2-compute-once")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def default_kv_budget(device: torch.device, fraction: float = 0.25) -> int:
    """Bytes the KV cache may take when the launch does not say: a share of free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    import os

    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return int(available * fraction)

