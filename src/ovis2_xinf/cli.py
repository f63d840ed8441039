"""``ovis2-xinf`` command line: ``specs``, ``doctor`` and ``demo``."""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import platform
import subprocess
import sys
import time
import unicodedata
from importlib import metadata
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import __version__

# Printed from a fresh interpreter by ``doctor``: what the import hook did there.
_STATUS_PROBE = "import json, xinference.model.llm; from ovis2_xinf.registration import status; print(json.dumps(status()))"


def bundled_checkpoint() -> Path:
    """The tiny original-format checkpoint shipped for the offline demo."""
    return Path(str(resources.files("ovis2_xinf").joinpath("assets", "tiny-ovis2")))


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def cmd_specs(args: argparse.Namespace) -> int:
    from .catalog import HUBS, load_catalog, resolve

    catalog = load_catalog()
    rows = []
    for spec, quantization in catalog.variants():
        ids = [resolve(spec.model_size_in_billions, spec.model_format, quantization, hub).model_id for hub in HUBS]
        rows.append([f"{spec.model_size_in_billions}B", spec.model_format, quantization, *ids])
    if args.json:
        keys = ["size", "format", "quantization", *HUBS]
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
    else:
        print(_table(rows, ["size", "format", "quantization", *HUBS]))
        print(f"\n{len(catalog.specs)} specs, {len(rows)} size/format/quantization choices")
    return 0


# Bidirectional controls reorder what a terminal shows after them.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters written as escapes.

    Newlines and tabs are kept; other C0/C1 controls (BEL, ESC, carriage return ...),
    line/paragraph separators, bidirectional controls and lone surrogates become
    escapes (``\\x07``, ``\\u2028``), so the random text of the bundled checkpoint cannot
    ring the bell, move the cursor or recolour the terminal.
    """
    out = []
    for char in text:
        if char in "\n\t" or (unicodedata.category(char) not in ("Cc", "Cs", "Zl", "Zp")
                               and char not in _BIDI_CONTROLS):
            out.append(char)
            continue
        code = ord(char)
        out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> Dict[str, object]:
    import torch

    info: Dict[str, object] = {"cpu": platform.processor() or platform.machine()}
    info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps and mps.is_available())
    return info


def cpu_dtype_report() -> Dict[str, Any]:
    """What ``auto`` loads an unquantized Ovis2 in on this CPU, for Ovis2-1B's shapes.

    The same choice a launch makes (:func:`ovis2_xinf.cpu_dtype.choose_cpu_dtype`, honouring
    ``OVIS2_XINF_CPU_DTYPE``): on a CPU with native bf16 its probe takes about a second on one core.
    """
    from .cpu_dtype import ProbeShapes, choose_cpu_dtype

    try:
        choice = choose_cpu_dtype(ProbeShapes.for_size(1))
    except ValueError as error:
        return {"error": str(error)}
    return {"shapes": "Ovis2-1B", **choice.as_dict()}


def _auto_gptq() -> str:
    """auto-gptq, if an older environment still has it: never used (GPTQModel serves GPTQ).

    Imported in a fresh interpreter, since it fails to import beside transformers 5.
    """
    version = _version("auto-gptq")
    if version == "not installed":
        return version
    done = subprocess.run([sys.executable, "-c", "import auto_gptq"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    if done.returncode == 0:
        return f"installed ({version}), not used: GPTQModel serves GPTQ checkpoints"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"installed ({version}), not used: {lines[-1].strip() if lines else 'it does not import'}"


def _worker_row(entry: Dict[str, Any]) -> Dict[str, Any]:
    status = entry.get("ovis2_xinf")
    models = entry.get("models")
    row: Dict[str, Any] = {
        "address": entry.get("work-ip"),
        "plugin_active": None,
        "plugin_version": None,
        "engine_class": None,
        "xinference_version": None,
        "models": len(models) if isinstance(models, (dict, list)) else None,
    }
    if isinstance(status, dict):
        row.update({k: status.get(k) for k in ("plugin_active", "plugin_version", "engine_class", "xinference_version")})
        if status.get("error"):
            row["error"] = status["error"]
    else:
        row["error"] = "the supervisor does not report ovis2-xinf status (the plugin is not active there)"
    return row


def doctor_endpoint(endpoint: str, api_key: Optional[str] = None, timeout: float = 60.0) -> Dict[str, Any]:
    """Ask a running Xinference which of its workers have the plugin active.

    The per-worker answer comes from ``GET /v1/workers``: where the plugin is active in
    the supervisor, each worker's entry carries ``ovis2_xinf``, which the supervisor gets
    from that worker's own Ovis2 registration (see
    :func:`ovis2_xinf.registration.worker_plugin_status` for why that signal: no stock
    endpoint tells it per worker). A supervisor without the plugin adds nothing, and its
    workers are reported as unknown. ``/v1/cluster/version`` gives the API's Xinference.
    """
    import httpx

    base = endpoint.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
        def get(path: str) -> Any:
            response = client.get(path)
            if response.status_code in (401, 403):
                hint = "" if api_key else "; pass --api-key"
                raise RuntimeError(f"{base}{path} answered {response.status_code} (it needs the admin scope{hint}): "
                                   f"{response.text[:300]}")
            response.raise_for_status()
            return response.json()

        _progress(f"asking {base} for workers…")
        entries = get("/v1/workers")
        try:
            version = get("/v1/cluster/version").get("version")
        except (httpx.HTTPError, RuntimeError, ValueError, AttributeError):
            version = None
    workers = [_worker_row(entry) for entry in entries if isinstance(entry, dict)]
    reported = any("ovis2_xinf" in entry for entry in entries if isinstance(entry, dict))
    return {
        "endpoint": base,
        "xinference_version": version,
        "supervisor_reports_plugin": reported,
        "workers": workers,
        "all_active": bool(workers) and all(w["plugin_active"] is True for w in workers),
    }


def _cmd_doctor_endpoint(args: argparse.Namespace) -> int:
    import httpx

    try:
        report = doctor_endpoint(args.endpoint, args.api_key)
    except (httpx.HTTPError, RuntimeError, ValueError) as error:
        print(f"ovis2-xinf doctor: cannot ask {args.endpoint}: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        state = {True: "active", False: "MISSING", None: "unknown"}
        rows = [[w["address"], state[w["plugin_active"]], w["plugin_version"] or "-", w["xinference_version"] or "-",
                 w["engine_class"] or "-", w.get("error", "")] for w in report["workers"]]
        print(f"Xinference {report['xinference_version'] or '?'} at {report['endpoint']}: "
              f"{len(rows)} worker(s)\n")
        print(_table(rows, ["worker", "plugin", "ovis2-xinf", "xinference", "Ovis2 served by", "note"]))
        missing = [w["address"] for w in report["workers"] if w["plugin_active"] is not True]
        if not report["workers"]:
            print("\nNo workers are registered.")
        elif missing:
            print(f"\nThe plugin is not active on: {', '.join(missing)}. Install it there: pip install ovis2-xinf"
                  + ("" if report["supervisor_reports_plugin"] else ", and on the supervisor, which reports nothing"))
    return 0 if report["all_active"] else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.endpoint:
        return _cmd_doctor_endpoint(args)
    from .quantization import GPTQ_INSTALL_HINT, gptq_backend_available
    from .registration import DISABLE_ENV, SUPPORTED_RANGE, is_supported_version, xinference_version

    report: Dict[str, object] = {
        "ovis2-xinf": __version__,
        "python": platform.python_version(),
        "xinference": _version("xinference"),
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "xinference_supported": is_supported_version(xinference_version()),
        "supported_range": ">={}.{},<{}.{}".format(*SUPPORTED_RANGE[0], *SUPPORTED_RANGE[1]),
        "gptq_backend": (
            f"gptqmodel {_version('gptqmodel')}" if gptq_backend_available() else f"missing ({GPTQ_INSTALL_HINT})"
        ),
        "auto_gptq": _auto_gptq(),
        "devices": _devices(),
    }
    _progress("timing bfloat16 against float32 on this CPU…")
    report["cpu_dtype_auto"] = cpu_dtype_report()
    _progress("checking registration in a fresh interpreter…")
    probe = subprocess.run(
        [sys.executable, "-c", _STATUS_PROBE], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    try:
        report["registration"] = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report["registration"] = {"error": (probe.stderr or probe.stdout)[-2000:]}
    registration = report["registration"]
    active = isinstance(registration, dict) and registration.get("class_first") and registration.get("family_is_ours")
    report["registration_active"] = bool(active)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if key == "cpu_dtype_auto":
                flags = value.get("bf16_flags")
                print(f"{'cpu_bf16_flags':22} {'unknown' if flags is None else ', '.join(flags) or 'none'}")
                value = value.get("describe", value.get("error"))
            print(f"{key:22} {value}")
        if not active:
            print(f"\nThe registration is not active; is {DISABLE_ENV} set, or Xinference unsupported?")
    return 0 if active else 1


def _demo_image_url() -> str:
    """A generated test picture, so the demo needs no file and no network."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 200), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 160, 160), fill=(240, 200, 40))
    draw.rectangle((190, 60, 290, 170), fill=(200, 40, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cmd_demo(args: argparse.Namespace) -> int:
    from openai import OpenAI

    from .local_server import local_server

    checkpoint = Path(args.model_path) if args.model_path else bundled_checkpoint()
    started = time.monotonic()
    print(f"Starting xinference-local on 127.0.0.1 (checkpoint: {checkpoint}) ...", flush=True)
    with local_server() as server:
        print(f"Server ready at {server.endpoint} after {time.monotonic() - started:.1f}s", flush=True)
        uid = server.launch(
            "--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", str(args.size),
            "--model-format", "pytorch", "--model-path", str(checkpoint),
        )
        print(f"Launched Ovis2 as model uid {uid!r}; streaming an image + text chat:", flush=True)
        client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed")
        stream = client.chat.completions.create(
            model=uid,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _demo_image_url()}},
                        {"type": "text", "text": args.prompt},
                    ],
                }
            ],
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        sys.stdout.write("> ")
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(printable(chunk.choices[0].delta.content))
                sys.stdout.flush()
            usage = chunk.usage or usage
        print()
        if usage is not None:
            print(f"usage: prompt {usage.prompt_tokens} tokens (image included), completion {usage.completion_tokens}")
        if checkpoint == bundled_checkpoint():
            print("(The bundled checkpoint has random weights: the text is meaningless, the serving path is real.)")
    print(f"Server stopped. Total {time.monotonic() - started:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovis2-xinf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ovis2-xinf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    specs = sub.add_parser("specs", help="the Ovis2 specs and their repo ids per hub")
    specs.add_argument("--json", action="store_true")
    specs.set_defaults(func=cmd_specs)

    doctor = sub.add_parser(
        "doctor", help="versions, registration status, GPTQ backend, devices; or, with --endpoint, per worker",
        description="Without --endpoint: this machine (versions, the registration in a fresh interpreter, GPTQ "
                    "backend, devices, and the dtype an unquantized model loads in on this CPU: bfloat16 where the "
                    "CPU has native bf16 and a short probe finds it faster). With --endpoint: whether the plugin is "
                    "active on each worker of a running Xinference. Exit code 1 when the registration (a worker's) "
                    "is not active, 2 when the endpoint cannot be asked.",
    )
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--endpoint", help="a running Xinference (supervisor or xinference-local), e.g. http://host:9997")
    doctor.add_argument("--api-key", help="bearer token for --endpoint when authentication is on (admin scope: "
                                          "Xinference lists workers to admins only)")
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="offline end-to-end chat on a throwaway local server")
    demo.add_argument("--model-path", help="an original-format Ovis2 checkpoint (default: the bundled tiny one)")
    demo.add_argument("--size", type=int, default=2, help="size in billions to launch as (default 2)")
    demo.add_argument("--prompt", default="Describe the image.")
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
