"""What a failed Ovis2 download says: the repo, the hub, the revision, how the hub was chosen, what to do.

Xinference's own message after its retries is ``Failed to download model 'Ovis2' (size: 34,
format: gptq) after multiple retries``: the same for 34B Int4 and Int8, with no repo id and
no hub, although the hub may have been picked by a connectivity probe the user never saw.
:func:`download_failure` writes the message that replaces it; the wrapper that raises it
lives in :mod:`ovis2_xinf.registration`, the one module that touches Xinference internals.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

MODEL_SRC_ENV = "XINFERENCE_MODEL_SRC"
#: The branch each hub's SDK downloads when the spec pins no revision.
DEFAULT_REVISION = {"huggingface": "main", "modelscope": "master"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_choice(hub: str, auto_detected: Optional[str], environ: Mapping[str, str] = os.environ) -> str:
    """How ``hub`` came to be used for this launch, as far as the worker can tell.

    ``auto_detected`` is the hub Xinference's connectivity probe settled on in this process
    (None when it never ran). The probe runs only when neither the launch nor
    ``XINFERENCE_MODEL_SRC`` names a hub, so a hub that matches neither was asked for.
    """
    pinned = environ.get(MODEL_SRC_ENV, "").strip()
    if pinned and pinned != "auto" and pinned == hub:
        return f"{MODEL_SRC_ENV}={pinned} on this worker"
    if auto_detected == hub:
        if any(_truthy(environ.get(var)) for var in _OFFLINE_VARS):
            return "auto-detected: Hugging Face offline mode is on (HF_HUB_OFFLINE), so only its local cache is read"
        endpoint = environ.get("HF_ENDPOINT") or "https://huggingface.co"
        if hub == "modelscope":
            return f"auto-detected: {endpoint} was not reachable from this worker, so Xinference fell back to ModelScope"
        return f"auto-detected: {endpoint} was reachable from this worker"
    return "asked for by the launch (download_hub)"


def _cause(exc: BaseException) -> str:
    """The first line of the deepest error, where the hub SDK said what went wrong."""
    while exc.__cause__ is not None and exc.__cause__ is not exc:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def download_failure(spec: Any, model_name: str, exc: BaseException, auto_detected: Optional[str],
                     environ: Mapping[str, str] = os.environ) -> RuntimeError:
    """The error to raise instead of Xinference's, for one flattened spec of the family.

    A plain ``RuntimeError``, as Xinference raises: it crosses actor boundaries by pickling
    and must unpickle in a supervisor or API process that may not have this package.
    """
    hub = spec.model_hub
    revision = spec.model_revision or f"{DEFAULT_REVISION.get(hub, 'the default branch')} (the default branch)"
    other = "modelscope" if hub == "huggingface" else "huggingface"
    size, model_format, quantization = spec.model_size_in_billions, spec.model_format, spec.quantization
    choice = f"{size}B {model_format}" + (f" {quantization}" if quantization and quantization != "none" else "")
    return RuntimeError(
        f"Could not download {model_name} {choice}: repo {spec.model_id} at revision {revision} from {hub} "
        f"({_cause(exc)}). The hub was {hub_choice(hub, auto_detected, environ)}. "
        f"To fix: launch with --download_hub {other} (or set {MODEL_SRC_ENV}={other} where the worker runs), "
        f"check that {hub} is reachable from the worker, or download the repo yourself and launch with "
        f"--model-path DIR."
    )
