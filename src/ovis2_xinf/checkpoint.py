"""Checkpoint conversion: original AIDC-AI Ovis2 layout onto transformers' native classes.

Nothing here imports or runs the checkpoint's ``*.py`` files. The config is translated
field by field and the weights are renamed (and the fused vision ``qkv`` split) while
they stream out of the safetensors shards, so no converted copy is ever written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

NUM_INDICATORS = 5
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint directory is not a usable original-format Ovis2 checkpoint."""


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _require(section: Dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return section[key]


@dataclass(frozen=True)
class PlaceholderIds:
    """Real token ids standing in for the original's negative placeholder ids.

    They sit in the padded rows of the embedding matrix, just above the tokenizer's
    last id, so they can never collide with text.
    """

    atom: int
    indicators: Tuple[int, ...]

    @classmethod
    def after_tokenizer(cls, tokenizer_size: int, vocab_size: int) -> "PlaceholderIds":
        needed = tokenizer_size + 1 + NUM_INDICATORS
        if needed > vocab_size:
            raise CheckpointError(
                f"embedding matrix has {vocab_size} rows but the tokenizer already uses "
                f"{tokenizer_size}; {1 + NUM_INDICATORS} free rows are needed for image placeholders"
            )
        return cls(tokenizer_size, tuple(range(tokenizer_size + 1, needed)))


@dataclass(frozen=True)
class OriginalCheckpoint:
    path: Path
    config: Dict[str, Any]
    preprocessor: Dict[str, Any]

    @classmethod
    def open(cls, path: Union[str, Path]) -> "OriginalCheckpoint":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        config = _read_json(path / CONFIG_FILE)
        where = str(path / CONFIG_FILE)
        model_type = config.get("model_type")
        if model_type != "ovis":
            raise CheckpointError(
                f"{where}: model_type is {model_type!r}, expected 'ovis' (an original AIDC-AI Ovis2 checkpoint)"
            )
        for key in ("llm_config", "visual_tokenizer_config"):
            if not isinstance(config.get(key), dict):
                raise CheckpointError(f"{where}: missing or invalid {key!r}")
        backbone = config["visual_tokenizer_config"].get("backbone_config")
        if not isinstance(backbone, dict):
            raise CheckpointError(f"{where}: visual_tokenizer_config.backbone_config is missing")
        preprocessor = _read_json(path / PREPROCESSOR_FILE)
        return cls(path, config, preprocessor)

    @property
    def llm_config(self) -> Dict[str, Any]:
        return self.config["llm_config"]

    @property
    def visual_config(self) -> Dict[str, Any]:
        return self.config["visual_tokenizer_config"]

    @property
    def quantization_config(self) -> Optional[Dict[str, Any]]:
        return self.config.get("quantization_config")

    @property
    def requested_attention(self) -> Optional[str]:
        return self.config.get("llm_attn_implementation")

    def image_size(self) -> int:
        """Crop side from the preprocessor config, checked against the backbone's."""
        crop = self.preprocessor.get("crop_size") or {}
        size = crop.get("height") or (self.preprocessor.get("size") or {}).get("shortest_edge")
        if not size:
            raise CheckpointError(f"{self.path / PREPROCESSOR_FILE}: no crop_size")
        backbone_size = self.visual_config["backbone_config"].get("image_size")
        if backbone_size is not None and int(backbone_size) != int(size):
            raise CheckpointError(
                f"{self.path / PREPROCESSOR_FILE}: crop size {size} differs from the vision "
                f"backbone's image_size {backbone_size} in {CONFIG_FILE}"
            )
        return int(size)

    def shard_files(self) -> List[Path]:
        index = self.path / SAFE_INDEX
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = [self.path / name for name in sorted(set(weight_map.values()))]
        elif (self.path / SAFE_SINGLE).exists():
            files = [self.path / SAFE_SINGLE]
        else:
            raise CheckpointError(f"{self.path}: no {SAFE_SINGLE} or {SAFE_INDEX} (only safetensors weights are loaded)")
        missing = [f for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{missing[0]}: weight shard listed in {SAFE_INDEX} is missing")
        return files


def native_config(
    checkpoint: OriginalCheckpoint, tokenizer_size: int, attn_implementation: str = "sdpa"
):
    """The native ``Ovis2Config`` equivalent to an original checkpoint's config."""
    from transformers import Ovis2Config, Qwen2Config
    from transformers.models.ovis2.configuration_ovis2 import Ovis2VisionConfig

    where = str(checkpoint.path / CONFIG_FILE)
    llm = dict(checkpoint.llm_config)
    llm.pop("architectures", None)
    if llm.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(f"{where}: llm_config.model_type {llm.get('model_type')!r} is not qwen2")
    text_config = Qwen2Config(**{k: v for k, v in llm.items() if k not in ("_name_or_path", "model_type")})
    visual = checkpoint.visual_config
    backbone = visual["backbone_config"]
    context = f"{where}: visual_tokenizer_config.backbone_config"
    vision_config = Ovis2VisionConfig(
        hidden_size=_require(backbone, "hidden_size", context),
        intermediate_size=_require(backbone, "intermediate_size", context),
        num_hidden_layers=_require(backbone, "num_hidden_layers", context),
        num_attention_heads=_require(backbone, "num_attention_heads", context),
        num_channels=backbone.get("num_channels", 3),
        image_size=checkpoint.image_size(),
        patch_size=_require(backbone, "patch_size", context),
        rms_norm_eps=backbone.get("rms_norm_eps", 1e-5),
        qkv_bias=bool(backbone.get("qkv_bias", False)),
        mlp_bias=bool(backbone.get("use_bias", False)),
        vocab_size=_require(visual, "vocab_size", f"{where}: visual_tokenizer_config"),
        hidden_stride=visual.get("hidden_stride", 1),
        num_visual_indicator_tokens=NUM_INDICATORS,
        tokenize_function=visual.get("tokenize_function", "softmax"),
    )
    ids = PlaceholderIds.after_tokenizer(tokenizer_size, text_config.vocab_size)
    config = Ovis2Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=ids.atom,
        visual_indicator_token_ids=list(ids.indicators),
        vocab_size=text_config.vocab_size,
        hidden_size=text_config.hidden_size,
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def original_shapes(config: Dict[str, Any], image_size: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor an original-format checkpoint with this ``config.json`` holds, with its shape.

    Used to check that the weight mapping covers real sizes, and to build random
    checkpoints of real shape for benchmarks.
    """
    llm = config["llm_config"]
    hidden, inter, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = llm["num_key_value_heads"] * (hidden // llm["num_attention_heads"])
    shapes: Dict[str, Tuple[int, ...]] = {"llm.model.embed_tokens.weight": (vocab, hidden), "llm.model.norm.weight": (hidden,)}
    if not llm.get("tie_word_embeddings", False):
        shapes["llm.lm_head.weight"] = (vocab, hidden)
    for i in range(llm["num_hidden_layers"]):
        p = f"llm.model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    visual = config["visual_tokenizer_config"]
    backbone = visual["backbone_config"]
    v_hidden, v_inter, patch = backbone["hidden_size"], backbone["intermediate_size"], backbone["patch_size"]
    stride, visual_vocab = visual.get("hidden_stride", 1), visual["vocab_size"]
    shapes.update({
        _VISION + "preprocessor.patchifier.proj.weight": (v_hidden, backbone.get("num_channels", 3), patch, patch),
        _VISION + "preprocessor.patchifier.proj.bias": (v_hidden,),
        _VISION + "preprocessor.patchifier.norm.weight": (v_hidden,),
        _VISION + "preprocessor.pos_embed": (1, (image_size // patch) ** 2, v_hidden),
        _VISION + "trunk.post_trunk_norm.weight": (v_hidden,),
        "visual_tokenizer.head.0.weight": (visual_vocab - NUM_INDICATORS, v_hidden * stride * stride),
        "visual_tokenizer.head.1.weight": (visual_vocab - NUM_INDICATORS,),
        "visual_tokenizer.head.1.bias": (visual_vocab - NUM_INDICATORS,),
        "vte.weight": (visual_vocab, hidden),
    })
    for i in range(backbone["num_hidden_layers"]):
        p = f"{_VISION}trunk.blocks.{i}."
        shapes.update({
            p + "attn.qkv.weight": (3 * v_hidden, v_hidden), p + "attn.proj.weight": (v_hidden, v_hidden),
            p + "mlp.fc1.weight": (v_inter, v_hidden), p + "mlp.fc2.weight": (v_hidden, v_inter),
            p + "mlp.fc3.weight": (v_inter, v_hidden), p + "norm_1.weight": (v_hidden,), p + "norm_2.weight": (v_hidden,),
        })
    return shapes


def config_digest_note(path: Union[str, Path], metadata: Any) -> Optional[str]:
    """Why the catalogue's memory metadata may not describe this checkpoint, or None.

    ``metadata`` is a spec's ``model_metadata`` (``config_source`` pinned to a commit,
    ``config_sha256``). Repos move on after the catalogue was read, so a differing
    ``config.json`` is reported, not refused: the weights are what the user asked for.
    """
    expected = getattr(metadata, "config_sha256", None)
    if not expected:
        return None
    config = Path(path) / "config.json"
    try:
        actual = hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError:
        return None
    if actual == expected:
        return None
    return (
        f"{config}: sha256 {actual} differs from the config the catalogue's metadata was verified on "
        f"({metadata.config_source}, sha256 {expected}); memory estimates describe that revision"
    )


def tokens_per_crop(config) -> int:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    side = -(-side // vision.hidden_stride)
    return side * side


# --- weight names ---------------------------------------------------------------------

_VISION = "visual_tokenizer.backbone."
_NATIVE_VISION = "model.vision_tower.transformer."
_BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "norm_1.": "rms_norm1.",
    "norm_2.": "rms_norm2.",
    "attn.proj.": "attention.out_proj.",
    "mlp.fc1.": "ffn.gate_proj.",
    "mlp.fc2.": "ffn.down_proj.",
    "mlp.fc3.": "ffn.up_proj.",
}
_FIXED = {
    "vte.weight": "model.visual_embeddings_table.weight",
    "visual_tokenizer.head.0.weight": "model.vision_tower.head_linear.weight",
    "visual_tokenizer.head.1.weight": "model.vision_tower.head_norm.weight",
    "visual_tokenizer.head.1.bias": "model.vision_tower.head_norm.bias",
    _VISION + "preprocessor.pos_embed": _NATIVE_VISION + "embeddings.position_embedding.weight",
    _VISION + "trunk.post_trunk_norm.weight": _NATIVE_VISION + "rms_norm.weight",
}
_PREFIXES = {
    "llm.model.": "model.language_model.",
    "llm.lm_head.": "lm_head.",
    _VISION + "preprocessor.patchifier.proj.": _NATIVE_VISION + "embeddings.patch_embedding.",
    _VISION + "preprocessor.patchifier.norm.": _NATIVE_VISION + "embeddings.rms_norm.",
}


def native_names(original: str) -> List[str]:
    """Native parameter name(s) for one original tensor name (three for a fused qkv)."""
    if original in _FIXED:
        return [_FIXED[original]]
    for prefix, native in _PREFIXES.items():
        if original.startswith(prefix):
            return [native + original[len(prefix):]]
    if original.startswith(_VISION):
        match = _BLOCK.match(original[len(_VISION):])
        if match:
            layer, rest = match.groups()
            base = f"{_NATIVE_VISION}encoder.layers.{layer}."
            if rest.startswith("attn.qkv."):
                suffix = rest[len("attn.qkv."):]
                return [f"{base}attention.{p}_proj.{suffix}" for p in ("q", "k", "v")]
            for part, native in _BLOCK_PARTS.items():
                if rest.startswith(part):
                    return [base + native + rest[len(part):]]
    raise CheckpointError(f"unexpected tensor {original!r}: not part of the original Ovis2 layout")


def convert_tensor(original: str, tensor: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (native name, tensor) pairs for one original tensor."""
    names = native_names(original)
    if len(names) == 3:
        if tensor.shape[0] % 3:
            raise CheckpointError(f"{original}: fused qkv with {tensor.shape[0]} rows cannot split in three")
        yield from zip(names, tensor.chunk(3, dim=0))
    elif original.endswith("preprocessor.pos_embed"):
        yield names[0], tensor.reshape(-1, tensor.shape[-1])
    else:
        yield names[0], tensor


#: Bytes read from one open shard before it is reopened; see iter_original_tensors.
REMAP_BYTES = 256 * 2**20
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _open_shard(shard: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(shard), framework="pt")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{shard}: cannot read safetensors ({exc})") from None


def iter_original_tensors(checkpoint: OriginalCheckpoint) -> Iterator[Tuple[str, Any, str]]:
    """Yield (name, open shard, shard path) without reading any tensor yet.

    A shard is memory-mapped, and every page read stays resident in this process
    until the mapping closes: with multi-GB shards the peak memory of a load would be
    the model plus a whole shard. Reopening the shard every ``REMAP_BYTES`` bounds that.
    """
    for shard in checkpoint.shard_files():
        opened = _open_shard(shard).__enter__()
        read = 0
        try:
            for name in list(opened.keys()):
                if read >= REMAP_BYTES:
                    opened.__exit__(None, None, None)
                    opened = None
                    opened = _open_shard(shard).__enter__()
                    read = 0
                view = opened.get_slice(name)
                read += math.prod(view.get_shape()) * _DTYPE_BYTES.get(view.get_dtype(), 4)
                yield name, opened, str(shard)
        finally:
            if opened is not None:
                opened.__exit__(None, None, None)
