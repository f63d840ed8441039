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

In a cluster every process needs this package, workers included. So that a worker
without it can be told from one with it, the family we publish carries an
``ovis2_xinf`` field (our version, the class serving it), which a worker reports with
its family (:func:`worker_plugin_status`). In the supervisor process
``SupervisorActor`` is wrapped (:func:`_wrap_supervisor`): ``/v1/workers`` then says per
worker whether the plugin is active there, and an Ovis2 launch placed on a worker
without it fails naming the plugin. Each process where the registration becomes active
logs one INFO line saying so, once Xinference has set up its logging.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import re
import sys
import threading
import time
from importlib import metadata
from importlib.abc import Loader, MetaPathFinder
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import __version__

logger = logging.getLogger(__name__)
#: The "active" line goes through a child of Xinference's own logger, so it reaches the
#: handlers (console, log file) and format Xinference configures in each of its processes.
announce_logger = logging.getLogger("xinference.ovis2_xinf")
#: Refused requests are logged where Xinference's own lines go, for the same reason.
requests_logger = logging.getLogger("xinference.ovis2_xinf.requests")
#: The one line a refused request logs, whichever process or check refused it.
REFUSED_LINE = "ovis2-xinf: refused a chat request (HTTP %d): %s"

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
FAMILY_NAME = "Ovis2"
#: Extra field of the Ovis2 family we publish (``LLMFamilyV2`` allows extra fields): what
#: a worker reports with its family tells whether our registration is active there.
MARKER = "ovis2_xinf"
MISSING_PLUGIN = "Ovis2 needs the ovis2-xinf plugin on worker {address}: pip install ovis2-xinf there"
SUPERVISOR_MODULE = "xinference.core.supervisor"
#: Seconds to wait for a worker's answer about its registration.
WORKER_RPC_TIMEOUT = 10.0
# Set while the supervisor launches a model that needs this plugin on its workers:
# the supervisor actor and the model uid.
_launching_ovis2: contextvars.ContextVar[Optional[Tuple[Any, str]]] = contextvars.ContextVar(
    "ovis2_xinf_launch", default=None
)
_announcement: Dict[str, Any] = {}
_announcement_lock = threading.Lock()


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
    runs the engine hook while our module is only half executed. The hook then finishes the
    registration (:func:`model_class_ready`) when the class is first looked up, so the model
    module never has to import this one.
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
    else:
        _when_defined(f"{__package__}.model", "Ovis2NativeChatModel", model_class_ready)


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

    serving = {p["llm_class"] for p in llm.LLM_ENGINES[family.model_name].get(ENGINE, [])}
    ours = _model_class_if_defined()
    active = ours is not None and serving == {ours}
    engine_class = ",".join(sorted(c.__name__ for c in serving)) or None
    setattr(family, MARKER, {"version": __version__, "engine_class": engine_class, "active": active})
    if active:
        _announce(f"ovis2-xinf {__version__} active: {family.model_name} served by {engine_class} "
                  f"(Xinference {xinference_version()})")


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


def _wrap_downloads() -> None:
    """Say which repo, hub and revision an Ovis2 download failed on, and what to do.

    Runs where the download does (the worker process): ``LLMCacheManager.cache`` is
    wrapped and, for our family only, Xinference's retry error is replaced by the one
    :func:`ovis2_xinf.downloads.download_failure` writes, chained to it.
    """
    from xinference.model.llm.cache_manager import LLMCacheManager

    original = LLMCacheManager.cache
    if getattr(original, _WRAPPED_MARK, False):
        return

    def cache(self) -> str:
        try:
            return original(self)
        except Exception as exc:
            family = getattr(self, "_llm_family", None)
            if family is None or family.model_name != FAMILY_NAME or getattr(self, "_model_uri", None):
                raise
            from xinference.model import utils as model_utils

            from .downloads import download_failure

            raise download_failure(family.model_specs[0], family.model_name, exc,
                                   getattr(model_utils, "_auto_detected_hub", None)) from exc

    setattr(cache, _WRAPPED_MARK, True)
    cache.__doc__ = original.__doc__
    LLMCacheManager.cache = cache


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
    _wrap_downloads()
    _log_client_errors_briefly()
    if _bootstrapped():
        model_class_ready(model_class())
    else:
        register_engine_registration_hook(MODEL_TYPE_LLM, _engine_hook)
    _when_defined(SUPERVISOR_MODULE, "SupervisorActor", _wrap_supervisor)
    _when_defined("xinference.core.model", "ModelActor", close_dropped_streams)
    logger.debug("ovis2-xinf: registration armed for Xinference %s", version)
    return True


def on_restful_api_loaded(api: ModuleType) -> bool:
    """Make every bad Ovis2 chat request a 400 naming its field, and log it in one line.

    Xinference answers most model-side exceptions with a generic HTTP 500 so worker
    internals never leak, its own request validation errors with a 500 too, and a stream
    that fails before its first token with HTTP 200 and an error event.
    :class:`~ovis2_xinf.errors.Ovis2RequestError` messages are written for clients (they
    name the field, URL or limit), so they become HTTP 400 with the message kept, and an
    Ovis2 request is checked (:func:`_guard_chat_requests`) before Xinference parses it.
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
        try:
            if isinstance(e, Ovis2RequestError):
                raise HTTPException(status_code=e.status_code, detail=_ACTOR_PREFIX.sub("", str(e)))
            return original(e, sanitize=sanitize)
        except HTTPException as answer:
            failure = _stream_failure.get()
            if failure is not None:
                failure["status"] = answer.status_code
            raise

    setattr(handle_request_limit_error, _WRAPPED_MARK, True)
    cls.handle_request_limit_error = staticmethod(handle_request_limit_error)
    _guard_chat_requests(cls, HTTPException)
    _log_client_errors_briefly()
    return True


#: Set while the first event of an Ovis2 stream is pulled: a client error there records its status.
_stream_failure: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar(
    "ovis2_xinf_stream_failure", default=None
)
#: Xinference's loggers that log a model's exception with its traceback at ERROR: the REST
#: layer (API process) and the model actor's call wrapper (model process).
_LOGGERS_OF_CLIENT_ERRORS = ("xinference.api.restful_api", "xinference.core.model")


async def _serves_ovis2(api: Any, model_uid: str) -> bool:
    try:
        described = await (await api._get_supervisor_ref()).describe_model(model_uid)
    except Exception:  # an unknown uid, a model still loading: the original handler says so
        return False
    return isinstance(described, dict) and described.get("model_name") == FAMILY_NAME


def _validation_message(error: Any) -> str:
    """Xinference's pydantic validation error as a client message naming each field."""
    parts = []
    for item in error.errors()[:3]:
        field = ".".join(str(piece) for piece in item.get("loc", ())) or "body"
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or str(error)


def check_chat_body(body: Dict[str, Any]) -> None:
    """What an Ovis2 chat body must pass before Xinference sees it: our shape checks, then
    Xinference's own request model, whose errors would otherwise be a 500."""
    from xinference._compat import ValidationError
    from xinference.types import CreateChatCompletion

    from .errors import Ovis2RequestError
    from .request_fields import check_body
    from .structured import requested

    check_body(body)
    requested(body)  # its messages name the structured-output fields better than the union's
    try:
        CreateChatCompletion.parse_obj({k: v for k, v in body.items() if k != "cache_salt"})
    except ValidationError as error:
        raise Ovis2RequestError(_validation_message(error)) from None
    except (RecursionError, ValueError, TypeError) as error:
        raise Ovis2RequestError(f"body: cannot be read as a chat request ({type(error).__name__})") from None


def _refused(http_error: type, status: int, detail: str) -> Exception:
    requests_logger.warning(REFUSED_LINE, status, detail)
    return http_error(status_code=status, detail=detail)


def _guard_chat_requests(cls: type, http_error: type) -> None:
    """Check an Ovis2 chat request before Xinference handles it, and keep a failed stream a 400.

    For a request to an Ovis2 model: the body is checked by :func:`check_chat_body` (a
    bad one is a 400 naming the field, before any work), and a stream's first event is
    awaited before the response starts (:func:`_stream_or_error`), so an error while the
    request is prepared (media, preprocessing, tokens) is answered with its status, not
    with HTTP 200 and an error event. ``n > 1`` is refused here because the REST layer
    removes ``n`` from what it passes to every model (``create_chat_completion``'s ``exclude``).
    """
    from .errors import Ovis2RequestError

    original = cls.create_chat_completion
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)  # Xinference checks each route's annotated return type
    async def create_chat_completion(self, request):
        try:
            body = await request.json()
        except RecursionError:
            raise _refused(http_error, 400, "body: JSON nested too deeply") from None
        except ValueError as error:  # Xinference would answer a 500, whatever the model
            raise _refused(http_error, 400, f"body: not valid JSON ({error})") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return await original(self, request)
        if not await _serves_ovis2(self, body["model"]):
            return await original(self, request)
        try:
            check_chat_body(body)
        except Ovis2RequestError as error:
            raise _refused(http_error, 400, str(error)) from None
        response = await original(self, request)
        if body.get("stream") and hasattr(response, "body_iterator"):
            return await _stream_or_error(response, http_error)
        return response

    setattr(create_chat_completion, _WRAPPED_MARK, True)
    cls.create_chat_completion = create_chat_completion


async def _stream_or_error(response: Any, http_error: type) -> Any:
    """The stream response once its first event is there, or the error that event carries.

    Xinference sends the headers (HTTP 200) before the model's stream yields anything, so a
    request that fails while it is prepared reaches the client as ``data: {"error": ...}``
    inside a successful response. Pulling the first event first, in a task of its own (the
    stream binds its cancellation to the task that starts it, which must not be the one that
    later serves the response), turns that into the error's own status.
    """
    events = response.body_iterator
    failure: Dict[str, Any] = {}

    async def first():
        token = _stream_failure.set(failure)
        try:
            return await events.__anext__()
        finally:
            _stream_failure.reset(token)

    try:
        event = await asyncio.create_task(first())
    except StopAsyncIteration:
        return response
    if "status" in failure:
        await events.aclose()
        try:
            detail = json.loads(event["data"])["error"]
        except (KeyError, TypeError, ValueError):
            detail = str(event)
        raise http_error(status_code=failure["status"], detail=detail)

    async def resumed():
        try:
            yield event
            async for later in events:
                yield later
        finally:
            await events.aclose()

    response.body_iterator = resumed()
    return response


class _ClientErrorsInOneLine(logging.Filter):
    """A client's bad request is no server fault: one WARNING line in the API process, none
    in the model process, instead of a traceback at ERROR in both."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import Ovis2RequestError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, Ovis2RequestError):
            return True
        if not self.keep:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = REFUSED_LINE, (error.status_code, _ACTOR_PREFIX.sub("", str(error)))
        record.exc_info = record.exc_text = None
        return True


def _log_client_errors_briefly() -> None:
    api_logger, model_logger = _LOGGERS_OF_CLIENT_ERRORS
    for name, keep in ((api_logger, True), (model_logger, False)):
        target = logging.getLogger(name)
        if not any(isinstance(f, _ClientErrorsInOneLine) for f in target.filters):
            target.addFilter(_ClientErrorsInOneLine(keep))


def close_dropped_streams(model_actor: type) -> None:
    """Close a stream's generator as soon as Xinference drops it.

    When a client disconnects, Xinference drops the model's stream generator
    (``__xoscar_destroy_generator__``) without closing it, and a reference cycle through
    the cancelled call's traceback keeps it suspended until the garbage collector runs,
    which may be minutes. Only closing it stops the generation behind it, so the
    dropped generator is closed here, right away or, when a pull is inside it (another
    thread, or an asynchronous generator's pending ``__anext__``), as soon as that pull returns. Applied to ``xinference.core.model.ModelActor`` once it is
    defined, in every process where the registration is armed (model processes use it).
    """
    original = model_actor.__xoscar_destroy_generator__
    if getattr(original, _WRAPPED_MARK, False):
        return

    async def __xoscar_destroy_generator__(self, generator_uid: str):
        dropped = self._generators.get(generator_uid)
        result = await original(self, generator_uid)
        if inspect.isgenerator(dropped) and dropped.gi_frame is not None:
            _close_when_free(dropped)
        elif inspect.isasyncgen(dropped) and dropped.ag_frame is not None:
            asyncio.get_running_loop().create_task(_aclose_when_free(dropped))
        return result

    setattr(__xoscar_destroy_generator__, _WRAPPED_MARK, True)
    model_actor.__xoscar_destroy_generator__ = __xoscar_destroy_generator__


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


async def _aclose_when_free(generator, poll_s: float = 0.02) -> None:
    while generator.ag_running:  # a pull is waiting inside it for its next token
        await asyncio.sleep(poll_s)
    await generator.aclose()


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


# --- the "active" log line -------------------------------------------------------------


def _logging_configured() -> bool:
    return announce_logger.hasHandlers()


def _flush_announcement() -> bool:
    """Log the pending line if Xinference's logging is set up; True once it has been logged."""
    with _announcement_lock:
        message = _announcement.get("pending")
        if message is None or not _logging_configured():
            return bool(_announcement.get("done"))
        del _announcement["pending"]
        _announcement["done"] = True
    announce_logger.info("%s", message)
    return True


def _announce(message: str) -> None:
    """Log ``message`` at INFO once in this process (a catalog refresh publishes again).

    The registration becomes active while Xinference imports its model package, before
    any of its processes has configured logging (``logging.config.dictConfig`` in its
    command line, service scripts and actor pools), so the line is held until that has
    happened: ``dictConfig`` is wrapped until the line has gone out.
    """
    with _announcement_lock:
        if _announcement.get("done") or "pending" in _announcement:
            return
        _announcement["pending"] = message
    if not _flush_announcement():
        _log_after_logging_config()


def _log_after_logging_config() -> None:
    import logging.config

    original = logging.config.dictConfig
    if getattr(original, _WRAPPED_MARK, False):
        return

    def dictConfig(config: Dict[str, Any]) -> None:
        original(config)
        if _flush_announcement() and logging.config.dictConfig is dictConfig:
            logging.config.dictConfig = original

    setattr(dictConfig, _WRAPPED_MARK, True)
    dictConfig.__doc__ = original.__doc__
    logging.config.dictConfig = dictConfig


# --- finding a class that is defined after our hook has run ----------------------------


def _run_guarded(callback: Callable[[Any], None], value: Any) -> None:
    try:
        callback(value)
    except Exception:  # never break Xinference because of the plugin
        logger.exception("ovis2-xinf: could not wrap %r", value)


class _CallbackLoader(Loader):
    def __init__(self, wrapped: Any, callback: Callable[[ModuleType], None]):
        self._wrapped = wrapped
        self._callback = callback

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        _run_guarded(self._callback, module)


class _PostImportFinder(MetaPathFinder):
    """One-shot: runs ``callback(module)`` right after module ``name`` has executed."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, self.callback)
                return spec
        return None


def _when_defined(module_name: str, attr: str, callback: Callable[[Any], None]) -> None:
    """Call ``callback(obj)`` once ``module_name.attr`` exists: now, or as soon as it is looked up.

    Our hook runs while Xinference imports ``xinference.model``, which
    ``xinference.core.supervisor`` does before it defines ``SupervisorActor`` (its last
    statement). Every user takes the class from the module after that (``from
    xinference.core.supervisor import SupervisorActor``, or pickle's ``getattr``), so a
    half-executed module gets a module subclass until the first look-up that finds the
    name: that one wraps the class and puts the plain module type back. A module that is
    not imported yet is caught right after its import instead.
    """
    module = sys.modules.get(module_name)
    if module is None:
        sys.meta_path.insert(0, _PostImportFinder(module_name, lambda m: _when_defined(module_name, attr, callback)))
        return
    value = module.__dict__.get(attr)
    if value is not None:
        _run_guarded(callback, value)
        return
    base = type(module)

    class _Watching(base):  # type: ignore[misc, valid-type]
        def __getattribute__(self, name: str) -> Any:
            if name == attr and type(self) is _Watching:
                found = base.__getattribute__(self, "__dict__").get(attr)
                if found is not None:
                    self.__class__ = base
                    _run_guarded(callback, found)
            return base.__getattribute__(self, name)

    try:
        module.__class__ = _Watching
    except TypeError:
        logger.warning("ovis2-xinf: cannot watch %s for %s; clusters get no plugin check", module_name, attr)


# --- clusters: which workers have the plugin -------------------------------------------


async def worker_plugin_status(worker_ref: Any, address: Optional[str] = None,
                               timeout: float = WORKER_RPC_TIMEOUT) -> Dict[str, Any]:
    """Whether our registration is active in a worker, from what that worker reports.

    The signal is the worker's own Ovis2 family, ``WorkerActor.get_model_registration("LLM",
    "Ovis2")`` (the call the supervisor itself uses to find which workers know a model):
    wherever our registration is active, the family it publishes carries the
    :data:`MARKER` field (our version, the class serving the Transformers engine, whether
    that is ours); a worker without the plugin returns Xinference's built-in family, which
    has none. The worker's Xinference version is its ``get_node_metadata()``, the value
    ``/v1/cluster/info?detailed=true`` shows.

    No existing endpoint tells a worker with the plugin from one without: ``/v1/workers``
    gives each worker's address and running models only, ``/v1/model_registrations`` and
    ``/v1/engines`` merge every worker's answer into one (deduplicated by name), the engine
    tables the workers report drop the serving class, and the runtime log holds only its
    last 256 KiB.

    ``plugin_active`` is True or False as the worker reported, None when it did not answer.
    """
    import asyncio

    status: Dict[str, Any] = {
        "plugin_active": None, "plugin_version": None, "engine_class": None, "xinference_version": None,
    }
    if worker_ref is None:
        status["error"] = f"worker {address} is not registered with the supervisor"
        return status

    async def ask(call):
        return await asyncio.wait_for(call, timeout)

    family, node = await asyncio.gather(
        ask(worker_ref.get_model_registration("LLM", FAMILY_NAME)), ask(worker_ref.get_node_metadata()),
        return_exceptions=True,
    )
    if isinstance(node, dict):
        status["xinference_version"] = node.get("software_version")
    if isinstance(family, BaseException):
        status["error"] = f"{type(family).__name__}: {family}"
        return status
    marker = getattr(family, MARKER, None) if family is not None else None
    if not isinstance(marker, dict):
        status["plugin_active"] = False
        return status
    status.update(plugin_active=bool(marker.get("active")), plugin_version=marker.get("version"),
                  engine_class=marker.get("engine_class"))
    return status


async def require_plugin(worker_refs: Iterable[Any]) -> None:
    """Refuse a placement on a worker that reports no active plugin (naming it)."""
    import asyncio

    unique = {ref.address: ref for ref in worker_refs}
    addresses = sorted(unique)
    statuses = await asyncio.gather(*[worker_plugin_status(unique[a], a) for a in addresses])
    for address, status in zip(addresses, statuses):
        if status["plugin_active"] is False:
            raise ValueError(MISSING_PLUGIN.format(address=address))


async def _report_launch_error(supervisor: Any, model_uid: str, message: str) -> None:
    """Put ``message`` where launch clients read errors (``xinference launch`` polls the
    replica statuses): a failure before any replica starts would otherwise leave none."""
    try:
        await supervisor._status_guard_ref.update_replica_status(
            model_uid, 0, {"status": "ERROR", "error_message": message}
        )
    except Exception:
        logger.debug("ovis2-xinf: could not record the launch error of %s", model_uid, exc_info=True)


def _needs_plugin(arguments: Dict[str, Any]) -> bool:
    kwargs = arguments.get("kwargs") or {}
    get = lambda name: arguments.get(name, kwargs.get(name))  # noqa: E731
    return (
        get("model_name") == FAMILY_NAME
        and str(get("model_type") or "LLM").upper() == "LLM"
        and str(get("model_engine") or ENGINE).lower() == ENGINE.lower()
    )


def _wrap_supervisor(cls: type) -> None:
    """Teach ``SupervisorActor`` about the plugin on its workers (supervisor process only).

    * ``get_workers_info`` (``GET /v1/workers``) adds ``ovis2_xinf``, the
      :func:`worker_plugin_status` of each worker;
    * an Ovis2 launch (Transformers engine) pinned with ``worker_ip`` is refused at once
      (HTTP 400, :data:`MISSING_PLUGIN`) when a pinned worker reports no active plugin;
    * any other Ovis2 launch sets a context flag, and the hub resolution every launch
      path does once its workers are chosen (``_resolve_download_hub_from_workers``)
      first refuses a chosen worker without the plugin the same way, recording the
      message in the replica status that ``xinference launch`` shows. Either way the
      worker never tries the hub's ``trust_remote_code`` files or the built-in class.
    """
    original_info = cls.get_workers_info
    if not getattr(original_info, _WRAPPED_MARK, False):
        async def get_workers_info(self) -> List[Dict[str, Any]]:
            import asyncio

            infos = await original_info(self)
            workers = dict(self._worker_address_to_worker)
            statuses = await asyncio.gather(*[
                worker_plugin_status(workers.get(info.get("work-ip")), info.get("work-ip")) for info in infos
            ])
            for info, status in zip(infos, statuses):
                info[MARKER] = status
            return infos

        setattr(get_workers_info, _WRAPPED_MARK, True)
        get_workers_info.__doc__ = original_info.__doc__
        cls.get_workers_info = get_workers_info

    original_launch = cls._launch_builtin_model
    if not getattr(original_launch, _WRAPPED_MARK, False):
        signature = inspect.signature(original_launch)

        async def _launch_builtin_model(self, *args, **kwargs):
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:  # let Xinference report its own argument error
                return await original_launch(self, *args, **kwargs)
            arguments = bound.arguments
            if not _needs_plugin(arguments):
                return await original_launch(self, *args, **kwargs)
            worker_ip = arguments.get("worker_ip")
            if worker_ip is not None and not self.is_local_deployment():
                # Pinned: refuse now, before a model uid is taken (a 400 to the caller).
                await require_plugin(self._get_worker_refs_by_ip(worker_ip))
            if arguments.get("model_uid") is None:  # the uid Xinference would pick, to report on
                arguments["model_uid"] = self._gen_model_uid(arguments["model_name"])
            token = _launching_ovis2.set((self, arguments["model_uid"]))  # its tasks inherit it
            try:
                return await original_launch(*bound.args, **bound.kwargs)
            finally:
                _launching_ovis2.reset(token)

        setattr(_launch_builtin_model, _WRAPPED_MARK, True)
        _launch_builtin_model.__wrapped__ = original_launch  # type: ignore[attr-defined]
        cls._launch_builtin_model = _launch_builtin_model

    original_hub = cls._resolve_download_hub_from_workers  # a staticmethod
    if not getattr(original_hub, _WRAPPED_MARK, False):
        async def _resolve_download_hub_from_workers(worker_refs, download_hub, model_path):
            launch = _launching_ovis2.get()
            if launch is not None:
                try:
                    await require_plugin(worker_refs)
                except ValueError as error:
                    await _report_launch_error(*launch, str(error))
                    raise
            return await original_hub(worker_refs, download_hub, model_path)

        setattr(_resolve_download_hub_from_workers, _WRAPPED_MARK, True)
        cls._resolve_download_hub_from_workers = staticmethod(_resolve_download_hub_from_workers)
