"""The Ovis2 spec catalogue: ``specs.json`` loaded into strict pydantic models.

``specs.json`` is the single source of truth for the family. Everything else (the
Xinference family objects, the CLI table, the docs) is derived from the models here, so
a mistake in the file must fail loudly at load time, naming the place in the file.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, List, Literal, NamedTuple, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PLACEHOLDER = "{quantization}"
SHA256 = r"^[0-9a-f]{64}$"
#: Where a spec's metadata was read: a Hugging Face ``config.json`` pinned to a commit.
CONFIG_SOURCE = r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/resolve/(?P<commit>[0-9a-f]{40})/config\.json$"
Hub = Literal["huggingface", "modelscope"]
HUBS: Tuple[str, ...] = ("huggingface", "modelscope")
ModelFormat = Literal["pytorch", "gptq"]


class CatalogError(ValueError):
    """``specs.json`` is malformed; the message names the file and the field."""


class SpecLookupError(LookupError):
    """A (size, format, quantization, hub) choice that the catalogue does not offer."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class HubSource(_Strict):
    model_id: str = Field(min_length=3, pattern=r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-{}]+$")
    model_revision: Optional[str] = Field(default=None, min_length=1)


class ModelMetadata(_Strict):
    """The LLM's dimensions as read from the checkpoint's ``config.json``.

    The same fields as Xinference's own ``ModelMetadata``: its memory estimates (``cal-model-mem``,
    the web UI's recommended configuration) read them instead of downloading the config.
    """

    vocab_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    config_source: str = Field(pattern=CONFIG_SOURCE)
    config_sha256: str = Field(pattern=SHA256)
    architecture_type: Literal["multimodal"]
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelMetadata":
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                f"num_key_value_heads {self.num_key_value_heads} do not divide evenly"
            )
        return self

    @property
    def config_commit(self) -> str:
        return re.match(CONFIG_SOURCE, self.config_source).group("commit")  # type: ignore[union-attr]

    @property
    def config_repo(self) -> str:
        return re.match(CONFIG_SOURCE, self.config_source).group("repo")  # type: ignore[union-attr]


class VisionBackbone(_Strict):
    """The AIMv2 backbone of the visual tokenizer (not part of Xinference's metadata)."""

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)


class Architecture(_Strict):
    """What the real-size checks need beyond the LLM metadata."""

    tie_word_embeddings: bool
    vision: VisionBackbone


class VisualTokenizer(_Strict):
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    hidden_stride: int = Field(gt=0)
    vocab_size: int = Field(gt=0)

    @model_validator(mode="after")
    def _patches_fit(self) -> "VisualTokenizer":
        if self.image_size % (self.patch_size * self.hidden_stride):
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size x hidden_stride "
                f"({self.patch_size} x {self.hidden_stride})"
            )
        return self


class VirtualEnv(_Strict):
    packages: List[str] = Field(min_length=1)


class FamilyInfo(_Strict):
    model_name: str = Field(min_length=1)
    context_length: int = Field(gt=0)
    model_lang: List[str] = Field(min_length=1)
    model_ability: List[Literal["chat", "vision", "generate"]] = Field(min_length=1)
    model_description: str = Field(min_length=1)
    architectures: List[str] = Field(min_length=1)
    stop: List[str] = Field(min_length=1)
    stop_token_ids: List[int] = Field(min_length=1)
    model_type: str = Field(min_length=1)
    virtualenv: VirtualEnv
    chat_template: str = Field(min_length=1)
    visual_tokenizer: VisualTokenizer
    #: ``len(tokenizer)`` of the real checkpoints (the embedding matrix is padded above it).
    tokenizer_size: int = Field(gt=0)


class ModelSpec(_Strict):
    model_format: ModelFormat
    model_size_in_billions: int = Field(gt=0)
    quantizations: List[str] = Field(min_length=1)
    hubs: Dict[Hub, HubSource]
    model_metadata: Optional[ModelMetadata] = None
    model_metadata_by_quantization: Optional[Dict[str, ModelMetadata]] = None
    architecture: Architecture

    @field_validator("quantizations")
    @classmethod
    def _quantizations_are_unique(cls, value: List[str]) -> List[str]:
        if len(set(q.lower() for q in value)) != len(value):
            raise ValueError(f"duplicate quantization in {value}")
        return value

    @model_validator(mode="after")
    def _placeholder_matches_quantizations(self) -> "ModelSpec":
        if set(self.hubs) != set(HUBS):
            raise ValueError(f"every spec must name both hubs {list(HUBS)}, got {sorted(self.hubs)}")
        if self.model_format == "pytorch" and self.quantizations != ["none"]:
            raise ValueError("pytorch specs take quantizations ['none']")
        if self.model_format != "pytorch" and "none" in self.quantizations:
            raise ValueError(f"{self.model_format} specs need real quantization names, not 'none'")
        for hub, source in self.hubs.items():
            has_placeholder = PLACEHOLDER in source.model_id
            if has_placeholder and self.quantizations == ["none"]:
                raise ValueError(
                    f"hubs.{hub}.model_id {source.model_id!r} has {PLACEHOLDER} but the spec has no quantizations"
                )
            if not has_placeholder and len(self.quantizations) > 1:
                raise ValueError(
                    f"hubs.{hub}.model_id {source.model_id!r} lacks {PLACEHOLDER} although "
                    f"quantizations {self.quantizations} would all share it"
                )
            stripped = source.model_id.replace(PLACEHOLDER, "")
            if "{" in stripped or "}" in stripped:
                raise ValueError(f"hubs.{hub}.model_id {source.model_id!r} has an unknown placeholder")
        if (self.model_metadata is None) == (self.model_metadata_by_quantization is None):
            raise ValueError("give exactly one of model_metadata and model_metadata_by_quantization")
        if self.model_metadata_by_quantization is not None:
            if sorted(self.model_metadata_by_quantization) != sorted(self.quantizations):
                raise ValueError(
                    f"model_metadata_by_quantization has {sorted(self.model_metadata_by_quantization)}, "
                    f"quantizations are {sorted(self.quantizations)}"
                )
        for quantization in self.quantizations:
            metadata = self.metadata_for(quantization)
            repo = self.hubs["huggingface"].model_id.replace(PLACEHOLDER, quantization)
            if metadata.config_repo != repo:
                raise ValueError(f"config_source {metadata.config_source!r} is not a config of {repo}")
        return self

    def metadata_for(self, quantization: str) -> ModelMetadata:
        """The metadata of one quantization (the same for all where the spec has one block)."""
        if self.model_metadata_by_quantization is not None:
            return self.model_metadata_by_quantization[quantization]
        assert self.model_metadata is not None
        return self.model_metadata

    @property
    def key(self) -> Tuple[str, int]:
        return (self.model_format, self.model_size_in_billions)


class Catalog(_Strict):
    schema_version: Literal[2]
    family: FamilyInfo
    specs: List[ModelSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _no_duplicate_specs(self) -> "Catalog":
        seen: Dict[Tuple[str, int], int] = {}
        for index, spec in enumerate(self.specs):
            if spec.key in seen:
                raise ValueError(
                    f"specs[{index}] duplicates specs[{seen[spec.key]}] "
                    f"(format {spec.model_format!r}, size {spec.model_size_in_billions}B)"
                )
            seen[spec.key] = index
        for index, spec in enumerate(self.specs):
            twin = next((s for s in self.specs if s.model_size_in_billions == spec.model_size_in_billions), spec)
            if spec.architecture != twin.architecture:
                raise ValueError(
                    f"specs[{index}].architecture differs from the {twin.model_format} spec of the same size"
                )
        return self

    def variants(self) -> List[Tuple[ModelSpec, str]]:
        """Every (spec, quantization) pair, in file order: the 11 launchable choices."""
        return [(spec, q) for spec in self.specs for q in spec.quantizations]


class ResolvedSpec(BaseModel):
    """One concrete, downloadable choice."""

    model_config = ConfigDict(frozen=True)

    model_format: str
    model_size_in_billions: int
    quantization: str
    hub: str
    model_id: str
    model_revision: Optional[str] = None


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
        lines.append(f"{source}: {path.lstrip('.') or '<root>'}: {item['msg']}")
    return "\n".join(lines)


def parse_catalog(data: Union[str, bytes, dict], source: str = "specs.json") -> Catalog:
    """Validate catalogue content, raising :class:`CatalogError` with file and field."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"{source}: not valid JSON: {exc}") from None
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(_format_errors(source, exc)) from None


def load_catalog_file(path: Union[str, Path]) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from None
    return parse_catalog(text, source=str(path))


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The packaged catalogue (cached: it is read in every Xinference process)."""
    text = resources.files("ovis2_xinf").joinpath("specs.json").read_text(encoding="utf-8")
    return parse_catalog(text, source="ovis2_xinf/specs.json")


def _choices(catalog: Catalog) -> str:
    return ", ".join(
        f"{spec.model_size_in_billions}B/{spec.model_format}/{q}" for spec, q in catalog.variants()
    )


def resolve(
    size_in_billions: Union[int, str],
    model_format: str = "pytorch",
    quantization: Optional[str] = None,
    hub: str = "huggingface",
    catalog: Optional[Catalog] = None,
) -> ResolvedSpec:
    """Turn a user's choice into the concrete repo id (and pinned revision, if any).

    Quantization names match case-insensitively, as Xinference matches them; ``None``
    means the spec's only quantization and is refused where there are several.
    """
    catalog = catalog or load_catalog()
    if hub not in HUBS:
        raise SpecLookupError(f"unknown hub {hub!r}; valid hubs: {', '.join(HUBS)}")
    try:
        size = int(str(size_in_billions).rstrip("bB"))
    except ValueError:
        raise SpecLookupError(
            f"size {size_in_billions!r} is not a number of billions; valid choices: {_choices(catalog)}"
        ) from None
    spec = next((s for s in catalog.specs if s.key == (model_format, size)), None)
    if spec is None:
        raise SpecLookupError(
            f"no Ovis2 spec with format {model_format!r} and size {size}B; valid choices: {_choices(catalog)}"
        )
    if quantization is None:
        if len(spec.quantizations) > 1:
            raise SpecLookupError(
                f"Ovis2 {size}B {model_format} needs a quantization, one of {spec.quantizations}"
            )
        quant = spec.quantizations[0]
    else:
        quant = next((q for q in spec.quantizations if q.lower() == quantization.lower()), None)
        if quant is None:
            raise SpecLookupError(
                f"Ovis2 {size}B {model_format} has no quantization {quantization!r}; "
                f"valid: {spec.quantizations}"
            )
    source = spec.hubs[hub]  # type: ignore[index]
    return ResolvedSpec(
        model_format=model_format,
        model_size_in_billions=size,
        quantization=quant,
        hub=hub,
        model_id=source.model_id.replace(PLACEHOLDER, quant),
        model_revision=source.model_revision,
    )


class RealDimensions(NamedTuple):
    """A real checkpoint's shapes, for building it on the meta device or with random weights."""

    #: hidden, intermediate, layers, heads, KV heads, vocabulary, tied embeddings
    llm: Tuple[int, int, int, int, int, int, bool]
    #: AIMv2 hidden, intermediate, layers, heads
    vision: Tuple[int, int, int, int]
    visual_tokenizer: VisualTokenizer
    tokenizer_size: int


def real_dimensions(size_in_billions: int, catalog: Optional[Catalog] = None) -> RealDimensions:
    """The dimensions the catalogue records for one size (of its pytorch spec)."""
    catalog = catalog or load_catalog()
    spec = next((s for s in catalog.specs if s.key == ("pytorch", size_in_billions)), None)
    if spec is None:
        raise SpecLookupError(f"no pytorch Ovis2 spec of {size_in_billions}B; valid choices: {_choices(catalog)}")
    m, arch = spec.metadata_for("none"), spec.architecture
    llm = (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
           m.vocab_size, arch.tie_word_embeddings)
    v = arch.vision
    vision = (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads)
    return RealDimensions(llm, vision, catalog.family.visual_tokenizer, catalog.family.tokenizer_size)


def resolve_all(catalog: Optional[Catalog] = None) -> List[ResolvedSpec]:
    """Every variant on every hub, in file order then hub order."""
    catalog = catalog or load_catalog()
    return [
        resolve(spec.model_size_in_billions, spec.model_format, q, hub, catalog)
        for spec, q in catalog.variants()
        for hub in HUBS
    ]
