"""The GPU machine's kit (.ci/devkit.py): its wheel pruning and its pins."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def devkit():
    spec = importlib.util.spec_from_file_location("devkit", ROOT / ".ci" / "devkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruning_drops_the_vendored_families_from_the_wheel_and_its_record(tmp_path):
    kit = devkit()
    wheel = tmp_path / "xinference-4.1.0-py3-none-any.whl"
    kept = ["xinference/__init__.py", "xinference/thirdparty/navidc_ocr/__init__.py",
            "xinference/thirdparty/indextts_extra.py"]
    dropped = ["xinference/thirdparty/indextts/model.py", "xinference/thirdparty/deepseek_vl2/big.bin"]
    record = "".join(f"{name},sha256=x,1\n" for name in kept + dropped) + "xinference-4.1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in kept + dropped:
            z.writestr(name, b"x" * 1000)
        z.writestr("xinference-4.1.0.dist-info/RECORD", record)
    assert kit.prune(wheel) > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted(kept + ["xinference-4.1.0.dist-info/RECORD"])
        listed = [line.split(",")[0] for line in z.read("xinference-4.1.0.dist-info/RECORD").decode().splitlines()]
    assert sorted(listed) == sorted(kept + ["xinference-4.1.0.dist-info/RECORD"])


def test_the_kit_pins_each_package_to_the_version_tested_here():
    kit = devkit()
    names = kit.requirements(ROOT / ".ci" / "device-wheels.txt")
    assert "xinference" in names and "ovis2-xinf" not in names  # the project travels as its own wheel
    from importlib import metadata

    assert kit.pinned(["xinference"]) == [f"xinference=={metadata.version('xinference')}"]
    assert len(kit.pinned(names)) == len(names)
    with pytest.raises(SystemExit, match="no-such-package-here .*not installed here"):
        kit.pinned(["no-such-package-here"])
