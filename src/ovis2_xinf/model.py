"""The Xinference model class that serves Ovis2 with transformers' native implementation.

It loads the original AIDC-AI checkpoints without running their code (see
:mod:`ovis2_xinf.loader`), turns OpenAI messages into the original Ovis prompt (see
:mod:`ovis2_xinf.messages`) and answers in OpenAI's chat format, streaming or not.

Concurrency: the class tells Xinference it may be called concurrently
(``allow_batch = True``), so requests are parsed, fetched and preprocessed in parallel
and a stream is pulled only as fast as its client reads it. The generations share the
model's decode steps through our own :class:`~ovis2_xinf.batching.BatchScheduler`
(continuous batching; Xinference's scheduler stays off, docs/architecture.md says why).
``chat`` is a coroutine and its streams are asynchronous generators: a request prepares on
a thread of Xinference's pool, then waits for its tokens on the event loop, holding no thread.
With ``allow_batch = False`` Xinference would instead drain every stream eagerly in the
model process, and a client that disconnects could not stop its generation (see also
:func:`ovis2_xinf.registration.close_dropped_streams`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

import torch
from xinference.model.llm.transformers.core import PytorchChatModel

from .checkpoint import config_digest_note, tokens_per_crop
from .errors import Ovis2LimitError, Ovis2RequestError
from .batching import BatchScheduler, RowOptions, default_kv_budget, kv_bytes_per_token, run_in_own_thread
from .linear_kernels import choose_linear_kernels
from .generation import SamplingPlan, TextEvent, plan_sampling, stream_text
from .logprobs import TokenText
from .logprobs import content as logprob_content
from .request_fields import refuse_unsupported, top_logprobs
from .structured import GrammarLimits, Grammars, requested
from .media import MediaLimits
from .messages import MEDIA_TYPES, build_conversation
from .preprocessing import DEFAULT_MAX_PARTITION_LIMIT, MAX_PARTITION_CEILING, Ovis2ImagePreprocessor
from .prompt import EncodedPrompt, encode, image_tokens
from .resample import hold_whole_images
from .reuse import ImageRef, ReuseCache, default_reuse_budget, image_key

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("pytorch", "gptq")
KV_BUDGET_ENV = "OVIS2_XINF_KV_CACHE_BUDGET_MIB"
REUSE_BUDGET_ENV = "OVIS2_XINF_REUSE_CACHE_MIB"
PREFILL_SLICE_ENV = "OVIS2_XINF_PREFILL_SLICE_MS"
MAX_PARTITION_ENV = "OVIS2_XINF_MAX_PARTITION"
MEDIA_WORKERS_ENV = "OVIS2_XINF_MEDIA_WORKERS"
DEFAULT_MEDIA_WORKERS = 2
#: Niceness of the threads that fetch, decode and resize media: a request's images must not
#: take the cores from the scheduler thread that decodes every other request's tokens.
MEDIA_NICENESS = 10
# Long enough that a chat prompt's prefill (0.45 s on 1B shapes, 2 CPU cores) never pauses, so a
# newcomer's TTFT under load stays that of its own prefill; an image's (4.5 s) pauses 3 times.
DEFAULT_PREFILL_SLICE_S = 1.0
SPECIAL_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _dtype(name: Any, device: str) -> torch.dtype:
    from xinference.device_utils import get_device_preferred_dtype

    if name in (None, "", "auto"):
        preferred = get_device_preferred_dtype(device)
        return preferred if preferred is not None else torch.float32
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch_dtype: {name!r} is not a torch dtype (try bfloat16, float16 or float32)")
    return value


def _number_option(config: Dict[str, Any], name: str, env: str, unit: str, positive: bool) -> Optional[float]:
    """A number of ``unit`` from the launch option, else the environment; None when neither."""
    value = config.get(name)
    if value is None:
        value = os.environ.get(env)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} / {env}: not a number of {unit}: {value!r}") from None
    if not number >= 0 or (positive and number == 0) or number == float("inf"):
        raise ValueError(f"{name} / {env}: must be {'positive' if positive else '0 (off) or more'}, got {value!r}")
    return number


def _mib_option(config: Dict[str, Any], name: str, env: str, positive: bool) -> Optional[int]:
    """A size in MiB from the launch option, else the environment, in bytes; None when neither."""
    number = _number_option(config, name, env, "MiB", positive)
    if number is None:
        return None
    size = int(number * (1 << 20))
    if positive and size == 0:
        raise ValueError(f"{name} / {env}: must be positive, got {number!r} (under a byte)")
    return size


def prefill_slice_option(config: Dict[str, Any]) -> Optional[float]:
    """Seconds a prefill may run while batch rows wait for their next token; None: it never pauses."""
    number = _number_option(config, "prefill_slice_ms", PREFILL_SLICE_ENV, "milliseconds", positive=False)
    if number is None:
        return DEFAULT_PREFILL_SLICE_S
    return number / 1000 if number else None


def _int_option(config: Dict[str, Any], name: str, env: str, unit: str, default: int,
                high: Optional[int] = None) -> int:
    """A whole number of ``unit``, 1 or more (at most ``high``), from the launch option, else the
    environment; ``default`` when neither gives one."""
    number = _number_option(config, name, env, unit, positive=True)
    if number is None:
        return default
    if number != int(number) or (high is not None and number > high):
        bound = "a positive integer" if high is None else f"an integer from 1 to {high}"
        raise ValueError(f"{name} / {env}: must be {bound}, got {number!r}")
    return int(number)


def max_partition_limit(config: Dict[str, Any]) -> int:
    """The most crops per image a request may ask for (launch option, else environment)."""
    return _int_option(config, "max_partition_limit", MAX_PARTITION_ENV, "crops", DEFAULT_MAX_PARTITION_LIMIT,
                       MAX_PARTITION_CEILING)


def media_workers(config: Dict[str, Any]) -> int:
    """How many requests may fetch, decode and resize media at once (launch option, else environment)."""
    return _int_option(config, "media_workers", MEDIA_WORKERS_ENV, "threads", DEFAULT_MEDIA_WORKERS)


def _lower_priority() -> None:
    """Make this thread yield the cores to the scheduler's (Linux niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MEDIA_NICENESS)
    except (AttributeError, OSError):  # no per-thread niceness here: the pool size still bounds the work
        logger.debug("ovis2: media threads keep their priority", exc_info=True)


def _has_media(messages: Any) -> bool:
    """Whether preparing a request fetches or decodes media (then it runs on the media threads)."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] in MEDIA_TYPES for p in content):
            return True
    return False


def _finish_reason(reason: str, options: RowOptions) -> str:
    """A grammar that has nothing left to allow ends the answer as a stop, not a length cut."""
    if reason == "length" and options.grammar is not None and options.grammar.finished:
        return "stop"
    return reason


def _positive_int(value: Any, field: str, error: type) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{field}: must be a positive integer, got {value!r}")


def _check_partition(value: Any, limit: int, field: str, error: type) -> None:
    _positive_int(value, field, error)
    if value > limit:
        raise error(f"{field}: {value} is over the limit of {limit} crops per image "
                    f"(launch option max_partition_limit, or {MAX_PARTITION_ENV})")


@dataclass
class _Prepared:
    encoded: EncodedPrompt
    plan: SamplingPlan
    include_usage: bool
    image_keys: List[str]  # one per image when reuse is on
    image_crops: List[int]
    grammar: Any  # a compiled grammar (structured output), or None
    top_logprobs: Optional[int]  # None: no logprobs


def _log_like_xinference() -> None:
    """Send this package's log lines where Xinference sends its own.

    Xinference configures only its own loggers (and transformers'); without this, our
    load and cancellation lines would be dropped in the model process.
    """
    ours, theirs = logging.getLogger("ovis2_xinf"), logging.getLogger("xinference")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


class Ovis2NativeChatModel(PytorchChatModel):
    allow_batch = True  # see the module docstring; Xinference's batch scheduler stays off

    @classmethod
    def match_json(cls, llm_family, llm_spec, quantization: str) -> Union[bool, Tuple[bool, str]]:
        if llm_spec.model_format not in SUPPORTED_FORMATS:
            return False, f"ovis2-xinf serves formats {SUPPORTED_FORMATS} only"
        if not (llm_family.has_architecture("Ovis") or llm_family.model_name == "Ovis2"):
            return False, "ovis2-xinf serves the Ovis2 family only"
        if "vision" not in llm_family.model_ability:
            return False, "ovis2-xinf requires the vision ability"
        return True

    # --- loading -------------------------------------------------------------------

    def _device_and_memory(self) -> Tuple[str, Optional[Dict[Union[int, str], int]]]:
        from xinference.model.utils import select_device

        device = select_device(self._pytorch_model_config.get("device", "auto"))
        max_memory = None
        if device == "cuda" and torch.cuda.device_count() > 1:
            max_memory = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(torch.cuda.device_count())}
        return device, max_memory

    def load(self) -> None:
        run_in_own_thread(self._load)

    def _load(self) -> None:
        from .loader import load_model
        from .quantization import quantization_loader_for

        _log_like_xinference()
        config = self._pytorch_model_config
        device, max_memory = self._device_and_memory()
        dtype = self._choose_dtype(config.get("torch_dtype"), device)
        attention = config.get("attn_implementation")
        if config.get("enable_flash_attn"):
            attention = "flash_attention_2"
        quantizer = quantization_loader_for(
            self.model_spec.model_format, self.model_path, device, config.get("gptq_mode", "kernel")
        )
        loaded = load_model(
            self.model_path,
            dtype=dtype,
            device=device if not max_memory else "cuda:0",
            attn_implementation=attention,
            max_memory=max_memory,
            quantization_loader=quantizer,
        )
        self._loaded = loaded
        dtype = loaded.dtype
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._device = device
        self._batch_scheduler = None
        self._preprocessor = Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor)
        self._preprocessor.warm_up()
        self._tokens_per_crop = tokens_per_crop(loaded.model.config)
        self._eos_ids = [i for i in (self._tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS) if i is not None]
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._eos_ids[-1]
        self._generation_defaults = self._read_generation_defaults()
        text_config = loaded.model.config.text_config
        self._context_length = int(
            config.get("context_length")
            or min(self.model_family.context_length or 32768, text_config.max_position_embeddings)
        )
        self._limits = MediaLimits.from_env()
        self._max_partition_limit = max_partition_limit(config)
        launch_partition = config.get("max_partition")
        if launch_partition is not None:
            _check_partition(launch_partition, self._max_partition_limit, "max_partition", ValueError)
        self._media_pool = ThreadPoolExecutor(media_workers(config), thread_name_prefix="ovis2-media",
                                              initializer=_lower_priority)
        self._media_busy = 0  # media threads working now; the scheduler computes on the other cores
        self._media_lock = threading.Lock()
        hold_whole_images(self._limits.max_image_pixels)  # request images are then read in place
        self._cores = torch.get_num_threads()
        self._scheduler = self._start_scheduler(config, loaded)
        self._grammar_limits = GrammarLimits.from_env()  # a bad setting fails the launch, not a request
        self._grammar_compiler: Optional[Grammars] = None
        self._grammar_lock = threading.Lock()
        self._token_text = TokenText(self._tokenizer)
        note = config_digest_note(self.model_path, getattr(self.model_spec, "model_metadata", None))
        if note:
            logger.warning("Ovis2 %s: %s", self.model_spec.model_id, note)
        logger.info(
            "Ovis2 loaded from %s on %s (%s, attention %s, context %d)",
            self.model_path, device, dtype, loaded.model.config.text_config._attn_implementation, self._context_length,
        )

    def _choose_dtype(self, requested: Any, device: str) -> torch.dtype:
        """``torch_dtype`` from the launch, else the device's own: on a CPU, bfloat16 where this
        CPU computes it natively and faster on the model's own shapes (:mod:`ovis2_xinf.cpu_dtype`)."""
        if device != "cpu" or requested not in (None, "", "auto"):
            return _dtype(requested, device)
        from .checkpoint import OriginalCheckpoint
        from .cpu_dtype import choose_cpu_dtype

        choice = choose_cpu_dtype(OriginalCheckpoint.open(self.model_path), self.model_spec.model_format)
        logger.info("Ovis2 on CPU computes in %s", choice.describe())
        return choice.dtype

    def _start_scheduler(self, config: Dict[str, Any], loaded) -> BatchScheduler:
        max_num_seqs = config.get("max_num_seqs") or 16
        _positive_int(max_num_seqs, "max_num_seqs", ValueError)
        device = loaded.model.get_input_embeddings().weight.device
        budget = _mib_option(config, "kv_cache_budget_mib", KV_BUDGET_ENV, positive=True)
        budget = default_kv_budget(device) if budget is None else budget
        reuse_budget = _mib_option(config, "reuse_cache_mib", REUSE_BUDGET_ENV, positive=False)
        self._reuse = ReuseCache(default_reuse_budget(device) if reuse_budget is None else reuse_budget)
        per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        prefill_slice = prefill_slice_option(config)
        logger.info("Ovis2 batching: up to %d sequences, KV budget %.0f MiB (%d tokens at %d bytes); reuse %s; "
                    "a prefill pauses for a decode step %s",
                    max_num_seqs, budget / (1 << 20), budget // per_token, per_token,
                    f"up to {self._reuse.budget_bytes / (1 << 20):.0f} MiB" if self._reuse.enabled else "off",
                    "never" if prefill_slice is None else f"every {prefill_slice * 1000:.0f} ms")
        if device.type == "cpu":
            tuned = choose_linear_kernels(loaded.model, max_num_seqs)
            logger.info("Ovis2 on CPU: %d language-model linears choose their kernel per decode batch size", len(tuned))
        return BatchScheduler(loaded.model, max_num_seqs, budget, per_token, reuse=self._reuse,
                              prefill_slice=prefill_slice,
                              compute_threads=self._compute_threads if device.type == "cpu" else None)

    def _compute_threads(self) -> int:
        """Threads the scheduler computes with: the cores the media threads leave."""
        return self._cores - self._media_busy

    def _prepare_media(self, messages: List[Dict], config: Dict[str, Any]) -> _Prepared:
        """:meth:`_prepare` on a media thread, counted so the scheduler leaves it a core."""
        with self._media_lock:
            self._media_busy += 1
        try:
            return self._prepare(messages, config)
        finally:
            with self._media_lock:
                self._media_busy -= 1

    def stop(self) -> None:
        scheduler = getattr(self, "_scheduler", None)
        if scheduler is not None:
            scheduler.close()
        pool = getattr(self, "_media_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        super().stop()

    def _read_generation_defaults(self) -> Dict[str, Any]:
        path = self._loaded.checkpoint.path / "generation_config.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None

    # --- requests --------------------------------------------------------------------

    def _option(self, config: Dict[str, Any], key: str) -> Any:
        """A per-request option, else the launch option.

        Xinference passes unknown top-level fields on to no model, so per-request
        options travel in ``mm_processor_kwargs`` (or ``chat_template_kwargs``).
        """
        for container in ("mm_processor_kwargs", "chat_template_kwargs"):
            extra = config.get(container)
            if isinstance(extra, str):
                try:
                    extra = json.loads(extra)
                except json.JSONDecodeError:
                    raise Ovis2RequestError(f"{container}: not a JSON object") from None
            if isinstance(extra, dict) and extra.get(key) is not None:
                return extra[key]
        return self._pytorch_model_config.get(key)

    def _prepare(self, messages: List[Dict], config: Dict[str, Any]) -> _Prepared:
        max_partition = self._option(config, "max_partition")
        if max_partition is not None:
            _check_partition(max_partition, self._max_partition_limit, "mm_processor_kwargs.max_partition",
                             Ovis2LimitError)
        video_frames = self._option(config, "video_frames")
        if video_frames is not None:
            _positive_int(video_frames, "mm_processor_kwargs.video_frames", Ovis2RequestError)
        conversation = build_conversation(messages, self._limits, max_partition, video_frames)
        # The images' tokens are known from their sizes alone: a request they cannot fit is
        # refused before any pixel is resized, and the text is measured against what is left.
        grids = [self._preprocessor.grid(i.width, i.height, conversation.max_partition) for i in conversation.images]
        images_tokens = sum(image_tokens(grid, self._tokens_per_crop) for grid in grids)
        if images_tokens >= self._context_length:
            raise Ovis2LimitError(
                f"messages: {len(grids)} image(s) at max_partition {conversation.max_partition} take "
                f"{images_tokens} tokens, reaching the context length of {self._context_length}; send fewer "
                "or smaller images or a lower max_partition")
        processed = self._preprocessor.batch(conversation.images, conversation.max_partition, grids)
        encoded = encode(self._tokenizer, conversation.turns, processed, self._loaded.placeholders,
                         self._tokens_per_crop, max_tokens=self._context_length)
        plan = plan_sampling(
            config,
            self._generation_defaults,
            self._eos_ids,
            self._pad_id,
            encoded.input_ids.shape[1],
            self._context_length,
        )
        options = config.get("stream_options") or {}
        keys = [image_key(p.pixel_values) for p in processed] if self._reuse.enabled else []
        grammar = self._grammars().compile(config) if requested(config, self._grammar_limits)[0] is not None else None
        return _Prepared(encoded, plan, bool(isinstance(options, dict) and options.get("include_usage")),
                         keys, [int(p.pixel_values.shape[0]) for p in processed], grammar, top_logprobs(config))

    def _inputs(self, encoded: EncodedPrompt) -> Dict[str, Any]:
        device = self._model.get_input_embeddings().weight.device
        inputs: Dict[str, Any] = {
            "input_ids": encoded.input_ids.to(device),
            "attention_mask": torch.ones_like(encoded.input_ids, device=device),
        }
        if encoded.pixel_values is not None:  # cast by the scheduler thread (batching.py says why)
            inputs["pixel_values"] = encoded.pixel_values
        return inputs

    def _events(self, prepared: _Prepared) -> Tuple[AsyncIterator[TextEvent], RowOptions]:
        inputs = self._inputs(prepared.encoded)
        images: List[ImageRef] = []
        if prepared.image_keys:
            pixels, first = inputs["pixel_values"], 0
            for key, crops, (start, end) in zip(prepared.image_keys, prepared.image_crops, prepared.encoded.image_spans):
                images.append(ImageRef(key, start, end, pixels[first:first + crops]))
                first += crops
        options = RowOptions(top_logprobs=prepared.top_logprobs)
        if prepared.grammar is not None:
            options.grammar = self._grammars().matcher(prepared.grammar)
        tokens = self._scheduler.submit_async(inputs, prepared.plan, images, options)
        return stream_text(tokens, self._tokenizer, prepared.plan, self._eos_ids), options

    def _grammars(self) -> Grammars:
        """The grammar compiler, made on the first request that needs one (llguidance loads then)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                vocab_size = self._model.get_output_embeddings().weight.shape[0]
                self._grammar_compiler = Grammars(self._tokenizer, vocab_size, self._eos_ids[0], self._grammar_limits)
            return self._grammar_compiler

    def _logprobs(self, options: RowOptions, start: int, end: int) -> Optional[Dict[str, Any]]:
        """``logprobs`` for the answer's tokens ``start:end`` (the end-of-turn token left out)."""
        if options.top_logprobs is None:
            return None
        records = [r for r in options.logprobs[start:end] if r.token not in self._eos_ids]
        return {"content": logprob_content(records, self._token_text), "refusal": None}

    def _usage(self, prepared: _Prepared, completion_tokens: int) -> Dict[str, int]:
        prompt_tokens = int(prepared.encoded.input_ids.shape[1])
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def chat(
        self, messages: List[Dict], generate_config: Optional[Dict[str, Any]] = None
    ) -> Union[Dict[str, Any], AsyncIterator[Dict[str, Any]]]:
        """A coroutine, so that a request waiting for its tokens holds no thread: Xinference
        runs a plain method, and every ``next`` of a plain generator, on its event loop's pool,
        which has ``min(32, cores + 4)`` threads (6 on 2 cores), fewer than ``max_num_seqs``."""
        config = dict(generate_config or {})
        logger.debug("chat request options: %s", sorted(config))
        refuse_unsupported(config)
        # Media work runs on its own few low-priority threads, so requests with many or large
        # images queue there and neither Xinference's pool nor the cores are taken from the rest.
        media = _has_media(messages)
        context = contextvars.copy_context()
        prepared = await asyncio.get_running_loop().run_in_executor(
            self._media_pool if media else None, context.run, self._prepare_media if media else self._prepare,
            messages, config)  # media, images, tokens
        if config.get("stream"):
            return self._stream_chunks(prepared)
        return await self._complete(prepared)

    async def _complete(self, prepared: _Prepared) -> Dict[str, Any]:
        text, finish_reason, completion_tokens = "", "length", 0
        events, options = self._events(prepared)
        try:
            async for event in events:
                text += event.text
                completion_tokens = event.completion_tokens
                if event.finish_reason:
                    finish_reason = _finish_reason(event.finish_reason, options)
        finally:  # a request cancelled while it waits ends its row
            await events.aclose()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_uid,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                    "logprobs": self._logprobs(options, 0, completion_tokens),
                }
            ],
            "usage": self._usage(prepared, completion_tokens),
        }

    async def _stream_chunks(self, prepared: _Prepared) -> AsyncIterator[Dict[str, Any]]:
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: Dict[str, Any], finish_reason: Optional[str], usage=None, choices=True,
                  logprobs=None) -> Dict[str, Any]:
            body: Dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_uid,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
                if choices
                else [],
            }
            if usage is not None:
                body["usage"] = usage
            return body

        events, options = self._events(prepared)
        completion_tokens = sent = 0
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for event in events:
                completion_tokens = event.completion_tokens
                if event.text:
                    yield chunk({"content": event.text}, None, logprobs=self._logprobs(options, sent, completion_tokens))
                    sent = completion_tokens
                if event.finish_reason:
                    rest = self._logprobs(options, sent, completion_tokens)
                    yield chunk({}, _finish_reason(event.finish_reason, options),
                                logprobs=rest if rest and rest["content"] else None)
            if prepared.include_usage:
                yield chunk({}, None, usage=self._usage(prepared, completion_tokens), choices=False)
        finally:
            await events.aclose()
