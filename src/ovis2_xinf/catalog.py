"""The Ovis2 spec catalogue: ``specs.json`` loaded into strict pydantic models.

``specs.json`` is the single source of truth for the family. Everything else (the
Xinference family objects, the CLI table, the docs) is derived from the models here, so
a mistake in the file must fail loudly at load time, naming the place in the file.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PLACEHOLDER = "{quantization}"
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


class FamilyInfo(_Strict):
    model_name: str = Field(min_length=1)
    context_length: int = Field(gt=0)
    model_lang: List[str] = Field(min_length=1)
    model_ability: List[Literal["chat", "vision", "generate"]] = Field(min_length=1)
    model_description: str = Field(min_length=1)
    architectures: List[str] = Field(min_length=1)
    stop: List[str] = Field(min_length=1)
    stop_token_ids: List[int] = Field(min_length=1)


class ModelSpec(_Strict):
    model_format: ModelFormat
    model_size_in_billions: int = Field(gt=0)
    quantizations: List[str] = Field(min_length=1)
    hubs: Dict[Hub, HubSource]

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
        return self

    @property
    def key(self) -> Tuple[str, int]:
        return (self.model_format, self.model_size_in_billions)


class Catalog(_Strict):
    schema_version: Literal[1]
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


def resolve_all(catalog: Optional[Catalog] = None) -> List[ResolvedSpec]:
    """Every variant on every hub, in file order then hub order."""
    catalog = catalog or load_catalog()
    return [
        resolve(spec.model_size_in_billions, spec.model_format, q, hub, catalog)
        for spec, q in catalog.variants()
        for hub in HUBS
    ]
