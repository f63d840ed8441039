"""The language model's attention on CPU: SDPA that keeps grouped key/value heads shared under a mask.

transformers' ``sdpa`` attention repeats each key/value head for its query heads whenever it
gets a mask (``use_gqa_in_sdpa`` in ``transformers/integrations/sdpa_attention.py``: on CUDA,
SDPA's efficient kernels do not take grouped heads with a mask). The rows of a running batch
are left-padded, so every batched decode step has a mask, and on Ovis2's Qwen2 models (7 query
heads per key/value head on 1B) the copies slowed a step at 16 rows to 0.89x of aligned rows
(``python -m benchmarks scheduler``, "left-padded", measures it with this attention: 1.00x).
On CPU, SDPA takes ``enable_gqa`` with a mask and computes the same output, so this attention
passes it there and leaves every other case (no mask, another device) to transformers' own function.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

NAME = "ovis2_sdpa_cpu"


def sdpa_sharing_kv_heads(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature; ``(output, None)`` as its ``sdpa`` returns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


def text_attention(attention: str, device: torch.device) -> str:
    """The language model's attention implementation for ``attention`` on ``device``.

    Only ``sdpa`` on CPU changes; the name is registered, with sdpa's masks, on first use."""
    if attention != "sdpa" or device.type != "cpu":
        return attention
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_sharing_kv_heads)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
