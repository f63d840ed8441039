"""Turn the spec catalogue into Xinference's own family and spec objects.

Xinference keeps one flattened spec per (hub, quantization) and downloads through its
cache manager according to ``download_hub`` / ``XINFERENCE_MODEL_SRC``; building its
objects (rather than a look-alike) is what lets that machinery work unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .catalog import HUBS, Catalog, load_catalog, resolve

if TYPE_CHECKING:  # pragma: no cover - typing only
    from xinference.model.llm.llm_family import LLMFamilyV2


def build_family(catalog: Optional[Catalog] = None) -> "LLMFamilyV2":
    """The ``LLMFamilyV2`` that Xinference lists and launches for Ovis2."""
    from xinference.model.core import VirtualEnvSettings
    from xinference.model.llm.llm_family import LLMFamilyV2, PytorchLLMSpecV2
    from xinference.model.llm.model_metadata import ModelMetadata

    catalog = catalog or load_catalog()
    info = catalog.family
    specs = []
    for hub in HUBS:
        for spec, quantization in catalog.variants():
            resolved = resolve(
                spec.model_size_in_billions, spec.model_format, quantization, hub, catalog
            )
            specs.append(
                PytorchLLMSpecV2(
                    model_format=resolved.model_format,
                    model_size_in_billions=resolved.model_size_in_billions,
                    quantization=resolved.quantization,
                    model_id=resolved.model_id,
                    model_hub=hub,
                    model_revision=resolved.model_revision,
                    # On both hubs: ModelScope mirrors the same AIDC-AI repos (the built-in
                    # family has it on Hugging Face only, so its ModelScope estimates download).
                    model_metadata=ModelMetadata(**spec.metadata_for(quantization).model_dump()),
                )
            )
    family = LLMFamilyV2(
        version=2,
        context_length=info.context_length,
        model_name=info.model_name,
        model_lang=list(info.model_lang),
        model_ability=list(info.model_ability),
        model_description=info.model_description,
        model_specs=specs,
        architectures=list(info.architectures),
        stop=list(info.stop),
        stop_token_ids=list(info.stop_token_ids),
        chat_template=info.chat_template,
        virtualenv=VirtualEnvSettings(packages=list(info.virtualenv.packages)),
        model_type=info.model_type,
    )
    family.is_builtin = True
    return family
