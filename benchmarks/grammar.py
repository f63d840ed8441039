"""Structured output cost (llguidance): grammar compile time and mask cost per token, against a decode step.

Measures the serving path's own code (``structured.Grammars`` / ``RowGrammar``): the tokenizer set up
once, then per schema the request's compile plus a fresh matcher, then a constrained generation driven
by random logits in which every token pays ``RowGrammar.mask`` (compute the bitmask, apply it to a
copy of the logits) and ``accept``. Between every few grammar steps one batch-1 decode step of the
LLM is timed (Qwen2 shapes, random weights, float32, a KV cache of ``context`` tokens), so that load
on a shared machine hits both alike; the figure that matters is their ratio.

``tiny`` (and ``--smoke``): the bundled tokenizer (547 tokens) and the tiny checkpoint's LLM shapes.
``1b``/``2b``: the real LLM shapes and a Qwen2.5-sized tokenizer: ``tokenizer`` if given, else a
byte-level BPE of 151,643 tokens plus Qwen2.5's 22 special tokens, trained once on the ``.py``,
``.txt`` and ``.md`` files of this interpreter's site-packages (80 MiB, about a minute) and kept under
``workdir``; the real Ovis2 tokenizer cannot be fetched offline, and what the mask costs depends on
the vocabulary's size and its tokens' lengths, which this stand-in shares with it.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
TARGET_RATIO = 0.05  # mask cost per token <= 5% of a decode step

# tests/test_structured.py's SCHEMA (copied: a benchmark must not move when a test changes).
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 8},
        "shape": {"enum": ["circle", "square", "triangle"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "colours": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}},
        "box": {"type": "object", "properties": {"visible": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
                "required": ["visible", "kind"], "additionalProperties": False},
    },
    "required": ["title", "shape", "size", "colours", "box"],
    "additionalProperties": False,
}

# What a "read this receipt" request sends: nested objects, an array of line items with enums,
# numbers, bounded strings, patterns, optional fields (16 leaf fields).
RECEIPT = {
    "type": "object",
    "properties": {
        "merchant": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 64},
            "address": {"type": "string", "maxLength": 128}},
            "required": ["name", "address"], "additionalProperties": False},
        "receipt_number": {"type": "string", "maxLength": 32},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["EUR", "USD", "GBP", "CHF", "JPY", "CNY"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "properties": {
                "description": {"type": "string", "maxLength": 80},
                "quantity": {"type": "number", "minimum": 0},
                "unit_price": {"type": "number"},
                "category": {"enum": ["food", "drink", "household", "electronics", "clothing", "other"]}},
            "required": ["description", "quantity", "unit_price", "category"], "additionalProperties": False}},
        "subtotal": {"type": "number"},
        "tax": {"type": "object", "properties": {"rate": {"type": "number", "minimum": 0, "maximum": 100},
                                                 "amount": {"type": "number"}},
                "required": ["rate", "amount"], "additionalProperties": False},
        "total": {"type": "number"},
        "payment": {"type": "object", "properties": {
            "method": {"enum": ["cash", "card", "mobile", "voucher"]},
            "card_last4": {"type": "string", "pattern": "^[0-9]{4}$"}},
            "required": ["method"], "additionalProperties": False},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["merchant", "date", "currency", "items", "total", "payment"],
    "additionalProperties": False,
}

CASES = {
    "test_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}},
    "receipt": {"response_format": {"type": "json_schema", "json_schema": {"name": "receipt", "schema": RECEIPT}}},
    "json_object": {"response_format": {"type": "json_object"}},
}

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_REGULAR_TOKENS = 151643
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def stand_in_tokenizer(workdir: Path, corpus_mib: int = 80) -> Path:
    """A Qwen2.5-sized byte-level BPE (Qwen2's pre-tokenizer), trained once and kept under ``workdir``."""
    target = workdir / f"qwen-sized-bpe-{QWEN_REGULAR_TOKENS}"
    if (target / "tokenizer.json").exists():
        return target
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = sysconfig.get_paths()["purelib"]
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                   if n.endswith((".py", ".txt", ".md")))
    random.Random(0).shuffle(files)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, size = workdir / "qwen-sized-bpe-corpus.txt", 0
    with corpus.open("w", encoding="utf-8") as out:
        for path in files:
            try:
                data = Path(path).read_bytes()[:256 * 1024]
                out.write(data.decode("utf-8") + "\n")
            except (OSError, UnicodeDecodeError):
                continue
            size += len(data)
            if size >= corpus_mib * 2 ** 20:
                break
    print(f"training a {QWEN_REGULAR_TOKENS}-token byte-level BPE on {size / 2 ** 20:.0f} MiB of {root} ...",
          flush=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=QWEN_REGULAR_TOKENS, min_frequency=1, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(QWEN_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(target))
    corpus.unlink()
    return target


def llm_config(model: str):
    """Qwen2 config of the LLM to time a decode step of: the tiny checkpoint's, or a real size's."""
    from transformers import Qwen2Config

    if model == "tiny":
        c = json.loads((TINY / "config.json").read_text())["llm_config"]
        dims = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                c["num_key_value_heads"], c["vocab_size"], c.get("tie_word_embeddings", True))
    else:
        from ovis2_xinf.catalog import real_dimensions

        dims = real_dimensions(int(model.rstrip("bB"))).llm
    hidden, inter, layers, heads, kv_heads, vocab, tied = dims
    return Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6)


def decode_timer(config, context: int) -> Callable[[], float]:
    """A function timing one batch-1 decode step with a KV cache of ``context`` tokens (cut back each time)."""
    from transformers import DynamicCache, Qwen2ForCausalLM

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    with torch.inference_mode():
        llm(input_ids=torch.randint(0, config.vocab_size, (1, context)), past_key_values=cache, use_cache=True)
    token, position = torch.tensor([[1]]), torch.tensor([[context]])

    def step() -> float:
        with torch.inference_mode():
            if cache.get_seq_length() > context:
                cache.crop(context - cache.get_seq_length())
            start = time.perf_counter()
            out = llm(input_ids=token, past_key_values=cache, use_cache=True, position_ids=position)
            int(out.logits[0, -1].argmax())
            return time.perf_counter() - start

    step()
    return step


def _median_ms(values: List[float]) -> float:
    return statistics.median(values) * 1e3


def run(model: str = "tiny", smoke: bool = False, workdir: Path = Path("/tmp/ovis2-xinf-bench"),
        tokenizer: Optional[Path] = None) -> Dict[str, Any]:
    from ovis2_xinf.loader import load_tokenizer
    from ovis2_xinf.structured import Grammars

    config = llm_config(model)
    if tokenizer is None:
        tokenizer = TINY if model == "tiny" else stand_in_tokenizer(workdir)
    tok = load_tokenizer(tokenizer)
    config.vocab_size = vocab = max(config.vocab_size, len(tok))  # a --tokenizer larger than the model's rows
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rounds, steps, compiles = (2, 5, 2) if smoke else (10, 20, 7)
    context = 32 if smoke else 500

    decode = decode_timer(config, context)
    setups = []
    for _ in range(1 if smoke else 3):
        start = time.perf_counter()
        grammars = Grammars(tok, vocab, eos)
        setups.append(time.perf_counter() - start)
    # The first mask in a process also compiles llguidance's apply kernel (torch.compile): once per process.
    first = grammars.matcher(grammars.compile(CASES["json_object"]))
    start = time.perf_counter()
    first.mask(torch.zeros(1, vocab))
    first_in_process = time.perf_counter() - start

    rows: List[Dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)
    for case, request in CASES.items():
        times = []
        for _ in range(compiles):
            start = time.perf_counter()
            grammar = grammars.compile(request)
            matcher = grammars.matcher(grammar)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        matcher.mask(torch.zeros(1, vocab))
        first_mask = time.perf_counter() - start
        matcher = grammars.matcher(grammar)
        masks, accepts, decodes, answer = [], [], [], []
        parsed = failed = cut = 0
        for _ in range(rounds):
            decodes.append(decode())
            for _ in range(steps):
                logits = torch.randn(1, vocab, generator=generator)
                start = time.perf_counter()
                masked = matcher.mask(logits)
                masks.append(time.perf_counter() - start)
                token = int(masked.argmax())
                start = time.perf_counter()
                matcher.accept(token)
                accepts.append(time.perf_counter() - start)
                if token != eos:
                    answer.append(token)
                if token == eos or matcher.finished or len(answer) >= 400:
                    if token == eos or matcher.finished:
                        try:
                            json.loads(tok.decode(answer))
                            parsed += 1
                        except ValueError:
                            failed += 1
                    else:
                        cut += 1
                    matcher, answer = grammars.matcher(grammar), []
        per_token = [m + a for m, a in zip(masks, accepts)]
        rows.append({
            "case": case, "compile_ms": _median_ms(times), "first_mask_ms": first_mask * 1e3,
            "mask_ms": _median_ms(masks), "accept_ms": _median_ms(accepts), "per_token_ms": _median_ms(per_token),
            "per_token_p95_ms": sorted(per_token)[int(0.95 * (len(per_token) - 1))] * 1e3,
            "decode_ms": _median_ms(decodes), "ratio": statistics.median(per_token) / statistics.median(decodes),
            "tokens": len(per_token), "answers_parsed": parsed, "answers_failed": failed, "answers_cut": cut,
        })
    worst = max(r["ratio"] for r in rows)
    return {
        "tokenizer": str(tokenizer), "tokenizer_tokens": len(tok), "vocab_size": vocab, "context": context,
        "llm": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads")},
        "setup_ms": _median_ms(setups), "first_mask_in_process_ms": first_in_process * 1e3, "rows": rows,
        "target_ratio": TARGET_RATIO, "verdict": {"worst_ratio": worst, "target_met": worst <= TARGET_RATIO},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
    }
