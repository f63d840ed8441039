"""Registration of the Ovis2 family and model class inside Xinference.

Xinference 4.x has no model-plugin entry point: its family list and engine tables are
per-process globals filled when ``xinference.model.llm`` is first imported. This is
the one module that touches that internal API, behind a version check. It is called
by the lazy import hook in :mod:`ovis2_xinf._autoload` in every process (API,
supervisor, worker, model subprocess) right after ``xinference.model.llm`` has
executed and before its ``_install()`` runs.

Two things are done there:

* the public pre-bootstrap hook of ``xinference.engine_hooks`` puts our class first in
  the Transformers engine list (the hook runs once per process, its result survives
  catalog refreshes because the list object itself is updated);
* ``xinference.model.llm._install`` is wrapped so that, after each (re)load of the
  built-in catalogue, the Ovis2 family is replaced by the one built from our
  ``specs.json`` and its engine and version tables are rebuilt.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
import threading
import time
from importlib import metadata
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

DISABLE_ENV = "OVIS2_XINF_DISABLE"
ENGINE = "Transformers"
LLM_MODULE = "xinference.model.llm"
#: Xinference releases whose internals this module was checked against.
SUPPORTED_RANGE: Tuple[Tuple[int, int], Tuple[int, int]] = ((4, 1), (5, 0))
_WRAPPED_MARK = "__ovis2_xinf_wrapped__"
#: The family object last published into Xinference's tables in this process.
_published: Dict[str, Any] = {}
# xoscar prefixes errors raised in actors with "[address=..., pid=...] ".
_ACTOR_PREFIX = re.compile(r"^\[address=[^\]]*\]\s*")


def is_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def xinference_version() -> Optional[str]:
    try:
        return metadata.version("xinference")
    except metadata.PackageNotFoundError:
        return None


def _parse_version(text: str) -> Tuple[int, int]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def is_supported_version(version: Optional[str]) -> bool:
    if not version:
        return False
    low, high = SUPPORTED_RANGE
    return low <= _parse_version(version) < high


def model_class() -> type:
    from .model import Ovis2NativeChatModel

    return Ovis2NativeChatModel


def _model_class_if_defined() -> Optional[type]:
    """Our class, unless ``ovis2_xinf.model`` is the import that is bootstrapping Xinference.

    A model subprocess imports ``ovis2_xinf.model`` first; its import of Xinference then
    runs the engine hook while our module is only half executed. The module finishes the
    registration itself (:func:`model_class_ready`) once the class exists.
    """
    module = sys.modules.get(f"{__package__}.model")
    if module is not None and not hasattr(module, "Ovis2NativeChatModel"):
        return None
    return model_class()


def _put_first(classes: List[type], cls: type) -> List[type]:
    return [cls] + [c for c in classes if c is not cls]


def _engine_hook(table: Dict[str, List[type]]) -> None:
    """Engine-registration hook: our class first for the Transformers engine."""
    cls = _model_class_if_defined()
    if cls is not None:
        table[ENGINE] = _put_first(table.get(ENGINE, []), cls)


def model_class_ready(cls: type) -> None:
    """Called when ``ovis2_xinf.model`` has defined the class; completes a deferred registration."""
    llm = sys.modules.get(LLM_MODULE)
    if llm is None or not getattr(getattr(llm, "_install", None), _WRAPPED_MARK, False) or not _bootstrapped():
        return
    classes = llm.TRANSFORMERS_CLASSES
    if classes and classes[0] is cls:
        return
    classes[:] = _put_first(classes, cls)
    llm.SUPPORTED_ENGINES[ENGINE] = classes
    _publish_family(llm)


def _publish_family(llm: ModuleType) -> None:
    """Replace the Ovis2 family and rebuild the tables derived from it."""
    from xinference.model.llm.core import LLM_VERSION_INFOS, generate_llm_version_info

    from .xinference_family import build_family

    family = build_family()
    families = llm.BUILTIN_LLM_FAMILIES
    index = next(
        (i for i, f in enumerate(families) if f.model_name == family.model_name), len(families)
    )
    families[:] = [f for f in families if f.model_name != family.model_name]
    families.insert(min(index, len(families)), family)
    # The built-in prompt style belongs to the hub code path; our class formats prompts itself.
    llm.BUILTIN_LLM_PROMPT_STYLE.pop(family.model_name, None)
    llm._register_model_family_metadata(family)

    engines: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    llm.generate_engine_config_by_model_family(family, engines)
    llm.LLM_ENGINES[family.model_name] = engines.get(family.model_name, {})
    _published["family"] = family
    LLM_VERSION_INFOS.pop(family.model_name, None)
    LLM_VERSION_INFOS.update(generate_llm_version_info(family))


def _wrap_install(llm: ModuleType) -> None:
    original = llm._install
    if getattr(original, _WRAPPED_MARK, False):
        return

    def _install() -> None:
        original()
        try:
            _publish_family(llm)
        except Exception:  # keep Xinference usable even if our family cannot be built
            logger.exception("ovis2-xinf: could not publish the Ovis2 family")

    setattr(_install, _WRAPPED_MARK, True)
    _install.__doc__ = original.__doc__
    llm._install = _install


def _bootstrapped() -> bool:
    from xinference.engine_hooks import MODEL_TYPE_LLM, _RAN_ENGINE_REGISTRATION_HOOKS

    return MODEL_TYPE_LLM in _RAN_ENGINE_REGISTRATION_HOOKS


def on_llm_module_loaded(llm: ModuleType) -> bool:
    """Arm the registration; returns whether it was armed.

    Called with the freshly executed ``xinference.model.llm`` module, before Xinference
    bootstraps its model tables. Also usable after bootstrap (see :func:`activate`).
    """
    if is_disabled():
        logger.info("ovis2-xinf: registration disabled by %s", DISABLE_ENV)
        return False
    version = xinference_version()
    if not is_supported_version(version):
        low, high = SUPPORTED_RANGE
        logger.warning(
            "ovis2-xinf: Xinference %s is not supported (need >=%d.%d,<%d.%d); "
            "Ovis2 stays on Xinference's built-in implementation",
            version, *low, *high,
        )
        return False
    from xinference.engine_hooks import MODEL_TYPE_LLM, register_engine_registration_hook

    _wrap_install(llm)
    if _bootstrapped():
        model_class_ready(model_class())
    else:
        register_engine_registration_hook(MODEL_TYPE_LLM, _engine_hook)
    logger.debug("ovis2-xinf: registration armed for Xinference %s", version)
    return True


def on_restful_api_loaded(api: ModuleType) -> bool:
    """Let our client errors through Xinference's error sanitizer with their message.

    Xinference answers most model-side exceptions with a generic HTTP 500 so worker
    internals never leak. :class:`~ovis2_xinf.errors.Ovis2RequestError` messages are
    written for clients (they name the field, URL or limit), so they become HTTP 400
    with the message kept, streaming or not.
    """
    if is_disabled() or not is_supported_version(xinference_version()):
        return False
    from fastapi import HTTPException

    from .errors import Ovis2RequestError

    cls = api.RESTfulAPI
    original = cls.handle_request_limit_error
    if getattr(original, _WRAPPED_MARK, False):
        return True

    def handle_request_limit_error(e: Exception, *, sanitize: bool = False):
        if isinstance(e, Ovis2RequestError):
            raise HTTPException(status_code=e.status_code, detail=_ACTOR_PREFIX.sub("", str(e)))
        return original(e, sanitize=sanitize)

    setattr(handle_request_limit_error, _WRAPPED_MARK, True)
    cls.handle_request_limit_error = staticmethod(handle_request_limit_error)
    return True


def close_dropped_streams() -> bool:
    """Close a stream's generator as soon as Xinference drops it.

    When a client disconnects, Xinference drops the model's stream generator
    (``__xoscar_destroy_generator__``) without closing it, and a reference cycle through
    the cancelled call's traceback keeps it suspended until the garbage collector runs,
    which may be minutes. Only closing it stops the generation behind it, so the
    dropped generator is closed here, right away or, when another thread is inside it,
    as soon as that thread leaves. Called in the model process by the model class.
    """
    if is_disabled() or not is_supported_version(xinference_version()):
        return False
    from xinference.core.model import ModelActor

    original = ModelActor.__xoscar_destroy_generator__
    if getattr(original, _WRAPPED_MARK, False):
        return True

    async def __xoscar_destroy_generator__(self, generator_uid: str):
        dropped = self._generators.get(generator_uid)
        result = await original(self, generator_uid)
        if inspect.isgenerator(dropped) and dropped.gi_frame is not None:
            _close_when_free(dropped)
        return result

    setattr(__xoscar_destroy_generator__, _WRAPPED_MARK, True)
    ModelActor.__xoscar_destroy_generator__ = __xoscar_destroy_generator__
    return True


def _close_when_free(generator, poll_s: float = 0.02) -> None:
    try:
        generator.close()
        return
    except ValueError:  # another thread is inside it (waiting for its next token)
        pass

    def retry() -> None:
        while generator.gi_frame is not None:
            try:
                generator.close()
            except ValueError:
                time.sleep(poll_s)

    threading.Thread(target=retry, name="ovis2-close-dropped-stream", daemon=True).start()


def activate() -> bool:
    """Register in this process, whatever has been imported already.

    The import hook does this by itself; call it where ``.pth`` files are not processed
    (``python -S``, some embedded interpreters).
    """
    import importlib

    armed = on_llm_module_loaded(importlib.import_module(LLM_MODULE))
    if "xinference.api.restful_api" in sys.modules:
        on_restful_api_loaded(sys.modules["xinference.api.restful_api"])
    return armed


def status() -> Dict[str, Any]:
    """What the registration looks like in this process (imports Xinference)."""
    import importlib

    llm = importlib.import_module(LLM_MODULE)
    cls = model_class()
    transformers_classes = llm.SUPPORTED_ENGINES.get(ENGINE, [])
    family = next((f for f in llm.BUILTIN_LLM_FAMILIES if f.model_name == "Ovis2"), None)
    engine_params = llm.LLM_ENGINES.get("Ovis2", {}).get(ENGINE, [])
    return {
        "xinference_version": xinference_version(),
        "supported": is_supported_version(xinference_version()),
        "disabled": is_disabled(),
        "import_hook_installed": any(
            type(f).__name__ == "_XinferenceFinder" for f in sys.meta_path
        ) or getattr(llm._install, _WRAPPED_MARK, False),
        "install_wrapped": bool(getattr(llm._install, _WRAPPED_MARK, False)),
        "class_first": bool(transformers_classes) and transformers_classes[0] is cls,
        "family_specs": len(family.model_specs) if family else 0,
        "family_is_ours": family is not None and family is _published.get("family"),
        "engine_classes": sorted({p["llm_class"].__name__ for p in engine_params}),
        "engine_choices": len(engine_params),
    }
