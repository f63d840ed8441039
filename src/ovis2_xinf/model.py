"""The Xinference model class that serves Ovis2 with transformers' native implementation."""

from __future__ import annotations

import logging
from typing import Tuple, Union

from xinference.model.llm.transformers.core import PytorchChatModel

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("pytorch", "gptq")


class Ovis2NativeChatModel(PytorchChatModel):
    @classmethod
    def match_json(cls, llm_family, llm_spec, quantization: str) -> Union[bool, Tuple[bool, str]]:
        if llm_spec.model_format not in SUPPORTED_FORMATS:
            return False, f"ovis2-xinf serves formats {SUPPORTED_FORMATS} only"
        if not (llm_family.has_architecture("Ovis") or llm_family.model_name == "Ovis2"):
            return False, "ovis2-xinf serves the Ovis2 family only"
        if "vision" not in llm_family.model_ability:
            return False, "ovis2-xinf requires the vision ability"
        return True
