"""The CPU attention that keeps grouped key/value heads shared under a padding mask."""

from __future__ import annotations

import torch

from ovis2_xinf.attention import NAME, sdpa_sharing_kv_heads, text_attention


class _Grouped(torch.nn.Module):
    num_key_value_groups = 7  # Ovis2-1B: 14 query heads over 2 key/value heads
    is_causal = True


def test_output_equals_transformers_sdpa_with_a_padding_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    rows, length = 5, 40
    query = torch.randn(rows, 14, 1, 64, generator=generator)
    key, value = (torch.randn(rows, 2, length, 64, generator=generator) for _ in range(2))
    mask = (torch.arange(length).unsqueeze(0) >= torch.arange(rows).unsqueeze(1) * 3)[:, None, None, :]
    ours, _ = sdpa_sharing_kv_heads(_Grouped(), query, key, value, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(_Grouped(), query, key, value, mask, scaling=0.125)
    assert ours.shape == theirs.shape == (rows, 1, 14, 64)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_only_the_cpu_language_model_sdpa_changes(tiny_model):
    assert text_attention("sdpa", torch.device("cpu")) == NAME
    assert text_attention("sdpa", torch.device("cuda", 0)) == "sdpa"
    assert text_attention("eager", torch.device("cpu")) == "eager"
    config = tiny_model.model.config
    assert config.text_config._attn_implementation == NAME
    assert config.vision_config._attn_implementation == "sdpa"
