"""Random checkpoints with the real Ovis2 architecture, in the original AIDC-AI layout.

Built locally (no download) so that memory, load time and throughput are measured at
real dimensions. Weights are random: only the shapes and the serving path are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import save_file

from ovis2_xinf.catalog import real_dimensions
from ovis2_xinf.checkpoint import original_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _layout(size: str) -> Tuple[Dict[str, Tuple[int, ...]], dict]:
    dims = real_dimensions(int(size))
    hidden, inter, layers, heads, kv_heads, vocab, tied = dims.llm
    v_hidden, v_inter, v_layers, v_heads = dims.vision
    visual = dims.visual_tokenizer
    image, patch, stride, visual_vocab = visual.image_size, visual.patch_size, visual.hidden_stride, visual.vocab_size
    config = json.loads((TINY / "config.json").read_text())
    config["llm_config"].update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                tie_word_embeddings=tied, max_position_embeddings=32768,
                                layer_types=["full_attention"] * layers)
    config["hidden_size"] = hidden
    visual = config["visual_tokenizer_config"]
    visual.update(vocab_size=visual_vocab, hidden_stride=stride)
    visual["backbone_config"].update(hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers,
                                     num_attention_heads=v_heads, image_size=image, patch_size=patch)
    return original_shapes(config, image), config


def _write_common(target: Path, config: dict) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copy(TINY / name, target / name)
    preprocessor = json.loads((TINY / "preprocessor_config.json").read_text())
    size = real_dimensions(1).visual_tokenizer.image_size
    preprocessor.update(crop_size={"height": size, "width": size}, size={"shortest_edge": size})
    (target / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    (target / "config.json").write_text(json.dumps(config, indent=1))


def _random(shape, dtype, generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def _speak_the_tokenizer(makers, config: dict) -> None:
    """Zero the output rows of ids the (tiny, bundled) tokenizer does not have.

    Random weights would otherwise pick ids that decode to nothing, and a served stream
    would carry no text to time.
    """
    from ovis2_xinf.loader import load_tokenizer

    known = len(load_tokenizer(TINY))
    name = "llm.model.embed_tokens.weight" if config["llm_config"].get("tie_word_embeddings") else "llm.lm_head.weight"
    make = makers[name]

    def limited():
        tensor = make()
        tensor[known:] = 0
        return tensor

    makers[name] = limited


def build_pytorch(size: str, target: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An original-layout checkpoint with random weights, one shard per LLM layer group."""
    if (target / "model.safetensors.index.json").exists():
        return target
    shapes, config = _layout(size)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_common(target, config)
    generator = torch.Generator().manual_seed(0)
    makers = {name: lambda s=shape: _random(s, dtype, generator) for name, shape in shapes.items()}
    _speak_the_tokenizer(makers, config)
    _save_sharded(target, makers)
    return target


def build_gptq(size: str, target: Path, bits: int = 4, group_size: int = 128) -> Path:
    """The same architecture with every LLM decoder linear GPTQ-packed (random codes)."""
    if (target / "model.safetensors.index.json").exists():
        return target
    shapes, config = _layout(size)
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": True,
                                     "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
                                     "pack_dtype": "int32", "lm_head": False}
    _write_common(target, config)
    generator = torch.Generator().manual_seed(0)
    makers = {}
    per_word = 32 // bits
    # every zero point 2**(bits-1), stored minus one as GPTQ v1 does; the top bit stays clear
    zero_word = sum((2 ** (bits - 1) - 1) << (bits * k) for k in range(per_word))
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if name.startswith("llm.model.layers.") and module.endswith(QUANTIZED) and name.endswith(".weight"):
            out_features, in_features = shape
            groups = in_features // group_size
            makers[module + ".qweight"] = lambda i=in_features, o=out_features: torch.randint(
                -2**31, 2**31 - 1, (i // per_word, o), dtype=torch.int32, generator=generator)
            makers[module + ".qzeros"] = lambda g=groups, o=out_features: torch.full(
                (g, o // per_word), zero_word, dtype=torch.int32)
            makers[module + ".scales"] = lambda g=groups, o=out_features: (torch.rand(g, o, generator=generator) * 0.01).half()
            makers[module + ".g_idx"] = lambda i=in_features: (torch.arange(i, dtype=torch.int32) // group_size)
        else:
            makers[name] = lambda s=shape: _random(s, torch.float16, generator)
    _speak_the_tokenizer(makers, config)
    _save_sharded(target, makers)
    return target


def _save_sharded(target: Path, makers, shard_bytes: int = 1 << 30) -> None:
    weight_map: Dict[str, str] = {}
    shard: Dict[str, torch.Tensor] = {}
    size = 0
    index = 0

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(target / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size = {}, 0

    for name, make in makers.items():
        tensor = make()
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
