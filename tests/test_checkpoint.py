"""Checkpoint conversion: config translation, weight names, real sizes on meta, broken dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from safetensors import safe_open

from conftest import TINY, lose_a_shard, remove_weights, set_wrong_model_type
from ovis2_xinf.catalog import load_catalog, real_dimensions
from ovis2_xinf.checkpoint import (
    CheckpointError,
    OriginalCheckpoint,
    config_digest_note,
    PlaceholderIds,
    convert_tensor,
    native_config,
    native_names,
    original_shapes,
    tokens_per_crop,
)
from ovis2_xinf.loader import build_empty_model, choose_attention, load_model, plan_device_map

REAL_SIZES = sorted({spec.model_size_in_billions for spec in load_catalog().specs})


def synthetic_checkpoint(llm, vision, visual_vocab, image_size, patch, stride, tokenizer_size=None):
    hidden, inter, layers, heads, kv_heads, vocab, tied = llm
    v_hidden, v_inter, v_layers, v_heads = vision
    config = {
        "model_type": "ovis",
        "llm_attn_implementation": "flash_attention_2",
        "llm_config": {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": inter,
                       "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                       "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": 32768},
        "visual_tokenizer_config": {
            "vocab_size": visual_vocab, "hidden_stride": stride, "tokenize_function": "softmax",
            "backbone_config": {"model_type": "aimv2", "hidden_size": v_hidden, "intermediate_size": v_inter,
                                "num_hidden_layers": v_layers, "num_attention_heads": v_heads,
                                "image_size": image_size, "patch_size": patch, "qkv_bias": False, "use_bias": False},
        },
    }
    preprocessor = {"crop_size": {"height": image_size, "width": image_size}}
    return OriginalCheckpoint(Path("/nonexistent"), config, preprocessor)


def test_original_shapes_match_the_tiny_fixture():
    """original_shapes() reproduces the fixture's keys and shapes exactly."""
    with safe_open(str(TINY / "model.safetensors"), "pt") as f:
        actual = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert original_shapes(json.loads((TINY / "config.json").read_text()), 56) == actual


def _native_shapes(model) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items() if "position_ids" not in name and "rotary" not in name}


def _converted_shapes(layout) -> Dict[str, Tuple[int, ...]]:
    converted = {}
    for name, shape in layout.items():
        for native, tensor in convert_tensor(name, torch.empty(shape, device="meta")):
            assert native not in converted, f"{native} produced twice"
            converted[native] = tuple(tensor.shape)
    return converted


def _real_checkpoint(size: int):
    dims = real_dimensions(size)
    visual = dims.visual_tokenizer
    return dims, synthetic_checkpoint(dims.llm, dims.vision, visual.vocab_size, visual.image_size, visual.patch_size,
                                      visual.hidden_stride)


@pytest.mark.parametrize("size", REAL_SIZES)
def test_real_size_mapping_covers_every_tensor(size):
    dims, checkpoint = _real_checkpoint(size)
    config = native_config(checkpoint, dims.tokenizer_size)
    model = build_empty_model(config)
    native = _native_shapes(model)
    converted = _converted_shapes(original_shapes(checkpoint.config, dims.visual_tokenizer.image_size))
    if dims.llm[6]:  # tied: lm_head shares the embedding matrix
        converted["lm_head.weight"] = converted["model.language_model.embed_tokens.weight"]
    assert sorted(set(native) - set(converted)) == []  # no missing
    assert sorted(set(converted) - set(native)) == []  # no unexpected
    assert {k: converted[k] for k in native} == native
    assert tokens_per_crop(config) == 256
    assert config.image_token_id == 151665 and list(config.visual_indicator_token_ids) == list(range(151666, 151671))


def test_native_config_from_tiny_fixture():
    checkpoint = OriginalCheckpoint.open(TINY)
    config = native_config(checkpoint, 547)
    assert config.vision_config.image_size == 56 and config.vision_config.hidden_stride == 2
    assert config.vision_config.vocab_size == 128 and config.vocab_size == 576
    assert config.image_token_id == 547 and list(config.visual_indicator_token_ids) == [548, 549, 550, 551, 552]
    assert config._attn_implementation == "sdpa"
    assert tokens_per_crop(config) == 4


def test_qkv_split_and_pos_embed():
    qkv = torch.arange(12.0).reshape(6, 2)
    parts = dict(convert_tensor("visual_tokenizer.backbone.trunk.blocks.3.attn.qkv.weight", qkv))
    base = "model.vision_tower.transformer.encoder.layers.3.attention."
    assert torch.equal(parts[base + "q_proj.weight"], qkv[:2])
    assert torch.equal(parts[base + "k_proj.weight"], qkv[2:4])
    assert torch.equal(parts[base + "v_proj.weight"], qkv[4:])
    (name, pos), = convert_tensor("visual_tokenizer.backbone.preprocessor.pos_embed", torch.zeros(1, 16, 32))
    assert name.endswith("embeddings.position_embedding.weight") and pos.shape == (16, 32)
    with pytest.raises(CheckpointError, match="cannot split in three"):
        list(convert_tensor("visual_tokenizer.backbone.trunk.blocks.0.attn.qkv.weight", torch.zeros(4, 2)))


def test_unknown_tensor_name_is_refused():
    with pytest.raises(CheckpointError, match="unexpected tensor 'visual_tokenizer.extra.weight'"):
        native_names("visual_tokenizer.extra.weight")


def test_placeholder_ids_need_free_rows():
    assert PlaceholderIds.after_tokenizer(547, 576).indicators == (548, 549, 550, 551, 552)
    with pytest.raises(CheckpointError, match="6 free rows are needed"):
        PlaceholderIds.after_tokenizer(572, 576)


def test_flash_attention_falls_back_to_sdpa_without_cuda():
    assert choose_attention("flash_attention_2", torch.device("cpu")) == "sdpa"
    assert choose_attention(None, torch.device("cpu")) == "sdpa"
    assert choose_attention("eager", torch.device("cpu")) == "eager"


def test_device_map_splits_over_several_gpus_without_splitting_layers():
    dims, checkpoint = _real_checkpoint(8)
    model = build_empty_model(native_config(checkpoint, dims.tokenizer_size))
    gib = 1024**3
    device_map = plan_device_map(model, {0: 10 * gib, 1: 10 * gib, "cpu": 64 * gib}, torch.bfloat16)
    assert {0, 1} <= set(device_map.values())
    for key in device_map:  # placed whole: nothing below a decoder or vision layer
        if ".layers." in key:
            assert key.split(".layers.", 1)[1].isdigit(), key


# --- broken checkpoint directories ------------------------------------------------------

@pytest.fixture
def copy_of_tiny(tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(TINY, target)
    return target


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    return str(info.value)


def test_missing_weights_file_is_named(copy_of_tiny):
    remove_weights(copy_of_tiny)
    assert "no model.safetensors or model.safetensors.index.json" in _load_error(copy_of_tiny)


def test_missing_shard_is_named(copy_of_tiny):
    lose_a_shard(copy_of_tiny)
    message = _load_error(copy_of_tiny)
    assert "model-00002-of-00002.safetensors: weight shard listed in model.safetensors.index.json is missing" in message


def test_wrong_model_type_is_named(copy_of_tiny):
    set_wrong_model_type(copy_of_tiny)
    assert "config.json: model_type is 'llava', expected 'ovis'" in _load_error(copy_of_tiny)


def test_corrupt_config_and_missing_preprocessor(copy_of_tiny):
    (copy_of_tiny / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json: missing" in _load_error(copy_of_tiny)
    (copy_of_tiny / "config.json").write_text("{")
    assert "config.json: not valid JSON" in _load_error(copy_of_tiny)


def test_truncated_weights_are_named(copy_of_tiny):
    weights = copy_of_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 100_000])
    assert "model.safetensors" in _load_error(copy_of_tiny)


def test_shape_mismatch_is_named(copy_of_tiny):
    config = json.loads((copy_of_tiny / "config.json").read_text())
    config["llm_config"]["intermediate_size"] = 256
    (copy_of_tiny / "config.json").write_text(json.dumps(config))
    message = _load_error(copy_of_tiny)
    assert "does not match the config's" in message and "mlp" in message


def test_missing_tensor_is_named(copy_of_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy_of_tiny / "model.safetensors"))
    del tensors["vte.weight"]
    save_file(tensors, str(copy_of_tiny / "model.safetensors"), metadata={"format": "pt"})
    assert "weights missing from the checkpoint: model.visual_embeddings_table.weight" in _load_error(copy_of_tiny)


def test_loader_never_reads_remote_code(copy_of_tiny):
    (copy_of_tiny / "modeling_ovis.py").write_text("raise SystemExit('remote code executed')\n")
    (copy_of_tiny / "configuration_ovis.py").write_text("raise SystemExit('remote code executed')\n")
    loaded = load_model(copy_of_tiny)
    assert type(loaded.model).__name__ == "Ovis2ForConditionalGeneration"


def test_reopening_shards_while_loading_changes_nothing(monkeypatch, tiny_model):
    """Shards are reopened every REMAP_BYTES to bound resident pages; the weights must not notice."""
    import ovis2_xinf.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "REMAP_BYTES", 1)  # reopen before every tensor
    reloaded = load_model(TINY).model.state_dict()
    original = tiny_model.model.state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def test_config_digest_note_names_the_verified_revision(tmp_path):
    import hashlib

    from ovis2_xinf.catalog import load_catalog

    metadata = load_catalog().specs[1].model_metadata
    (tmp_path / "config.json").write_text('{"model_type": "ovis"}')
    note = config_digest_note(tmp_path, metadata)
    assert note and "config.json: sha256 " in note
    assert "AIDC-AI/Ovis2-2B/resolve/63d303670a24612b2d0dd368490fcd7f75989d73/config.json" in note
    same = metadata.model_copy(update={"config_sha256": hashlib.sha256(b'{"model_type": "ovis"}').hexdigest()})
    assert config_digest_note(tmp_path, same) is None
    assert config_digest_note(tmp_path, None) is None
