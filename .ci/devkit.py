"""Build ``.devkit/``: what the lent GPU machine needs to run ``.ci/device-check`` offline.

That machine reaches no registry and its image already holds torch, transformers and most of
our runtime; it lacks Xinference and the packages in ``.ci/device-wheels.txt``. They travel as
wheels for its Python, next to a wheel of this project. The largest folders of Xinference's
``thirdparty/`` (other model families' code, 42 of its 55 MB) are dropped, so the kit and the
working tree fit the device call's 64 MiB.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# The largest of Xinference's vendored model families, none imported when Xinference starts
# (``controlnet`` and ``navidc_ocr`` are, so they stay).
DROPPED = tuple(f"xinference/thirdparty/{name}/" for name in (
    "indextts", "deepseek_vl2", "melo", "magika", "cosyvoice", "f5_tts", "mineru", "ace_step_1_5", "deepseek_vl",
    "whisper"))
LIMIT = 56 << 20  # a device call carries 64 MiB, the working tree (6 MB) included

log = logging.getLogger("devkit")


def requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pinned(names: list[str]) -> list[str]:
    """Each package at the version installed here: the kit carries what this environment tested."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} (.ci/device-wheels.txt): not installed here; run this with the project's "
                             f"test environment (.venv/bin/python .ci/devkit.py)") from None
    return out


def pip(*args: str, python: str = sys.executable, check: bool = True) -> subprocess.CompletedProcess:
    """``check=False``: a failure is the caller's to handle, so pip's output is kept, not shown."""
    return subprocess.run([python, "-m", "pip", "-q", *args], check=check, capture_output=not check, text=True)


def builder_for(version: str) -> str | None:
    """An interpreter of the GPU machine's Python version here, to build its compiled sdists."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    candidates = [found] if found else []
    candidates += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python{version}"))
    for candidate in candidates:
        if subprocess.run([candidate, "-c", "import pip"], capture_output=True).returncode == 0:
            return candidate
    return None


def fetch(requirement: str, python: str, into: Path, builder: str | None) -> None:
    """A binary wheel for ``python`` on x86-64 Linux, else one built here from the sdist: by
    ``builder`` (that Python) when there is one, else by this interpreter if it comes out pure."""
    tags = [f"--platform={p}" for p in PLATFORMS]
    download = pip("download", "--no-deps", "--only-binary=:all:", f"--python-version={python}", "--implementation=cp",
                   *tags, "-d", str(into), requirement, check=False)
    if download.returncode == 0:
        return
    log.info("%s: no binary wheel for Python %s, building it from its sdist", requirement, python)
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "--no-deps", "-w", tmp, requirement, python=builder or sys.executable)
        (built,) = Path(tmp).glob("*.whl")
        pure = built.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl"))
        if not pure and not builder:
            raise SystemExit(f"{requirement}: its sdist compiles ({built.name}), and no Python {python} was found "
                             f"here to build it for the GPU machine; pass --build-python")
        shutil.move(str(built), into / built.name)


def prune(wheel: Path) -> int:
    """Drop ``DROPPED`` folders from ``wheel`` (and from its RECORD); the bytes saved."""
    before = wheel.stat().st_size
    pruned = wheel.with_suffix(".pruned")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROPPED):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [r for r in data.decode().splitlines(keepends=True) if not r.startswith(DROPPED)]
                data = "".join(kept).encode()
            dst.writestr(info, data)
    pruned.replace(wheel)
    return before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=ROOT / ".devkit")
    parser.add_argument("--build-python", help="a Python of that version here, for sdists that compile "
                                               "(default: found on PATH or under ~/.pyenv)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    wheels = args.out / "wheels"
    shutil.rmtree(args.out, ignore_errors=True)
    wheels.mkdir(parents=True)
    builder = args.build_python or builder_for(args.python)
    for requirement in pinned(requirements(ROOT / ".ci" / "device-wheels.txt")):
        fetch(requirement, args.python, wheels, builder)
    for wheel in wheels.glob("xinference-*.whl"):
        log.info("%s: %d MB of thirdparty/ dropped", wheel.name, prune(wheel) >> 20)
    pip("wheel", "--no-deps", "-w", str(wheels), str(ROOT))
    files = list(wheels.iterdir())
    size = sum(p.stat().st_size for p in files)
    log.info("%d wheels, %.1f MiB in %s", len(files), size / (1 << 20), wheels)
    if size > LIMIT:
        raise SystemExit(f"{wheels}: {size >> 20} MiB, over the {LIMIT >> 20} MiB a device call can carry")


if __name__ == "__main__":
    main()
