"""Shared paths and the loaded tiny checkpoint for the tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The golden references are float32 runs: servers the tests start compute in float32 unless a test
# asks for the CPU's own choice (tests/test_bad_input.py does; bf16 parity: tests/test_bf16_cpu.py).
os.environ.setdefault("OVIS2_XINF_CPU_DTYPE", "float32")

FIXTURES = Path(__file__).parent / "fixtures"
TINY = Path(__file__).parents[1] / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
CASES_DIR = FIXTURES / "tiny-ovis2-cases"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return TINY


@pytest.fixture(scope="session")
def cases() -> dict:
    return json.loads((CASES_DIR / "cases.json").read_text())


@pytest.fixture(scope="session")
def reference_tensors() -> dict:
    from safetensors.torch import load_file

    return load_file(str(CASES_DIR / "tensors.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    from ovis2_xinf.loader import load_model

    return load_model(TINY)


# Ways to break a copy of a checkpoint directory, shared by the loader's unit tests and
# the launch tests through Xinference.
def remove_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def lose_a_shard(path: Path) -> None:
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def set_wrong_model_type(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llava"
    (path / "config.json").write_text(json.dumps(config))


def run_golden_case(loaded, name: str, device: str = "cpu"):
    """Last logits (float32, on the CPU), the greedy tokens and the case, for one golden case,
    generated with the settings the references were made with."""
    import torch
    from PIL import Image

    from ovis2_xinf.checkpoint import tokens_per_crop
    from ovis2_xinf.preprocessing import Ovis2ImagePreprocessor
    from ovis2_xinf.prompt import Turn, encode

    golden = json.loads((CASES_DIR / "cases.json").read_text())
    case, generation = golden["cases"][name], golden["generation"]
    pre = Ovis2ImagePreprocessor(loaded.checkpoint.preprocessor)
    images = pre.batch([Image.open(CASES_DIR / "images" / f) for f in case["images"]], case["max_partition"])
    encoded = encode(loaded.tokenizer, [Turn(t["from"], t["value"]) for t in case["conversation"]], images,
                     loaded.placeholders, tokens_per_crop(loaded.model.config))
    ids = encoded.input_ids.to(device)
    pixels = encoded.pixel_values.to(device, loaded.dtype) if encoded.pixel_values is not None else None
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, pixel_values=pixels).logits[0, -1].float().cpu()
        out = loaded.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=generation["max_new_tokens"],
                                    do_sample=False, eos_token_id=generation["eos_token_id"],
                                    pad_token_id=generation["pad_token_id"])
    return logits, out[0, ids.shape[1]:].tolist(), case
