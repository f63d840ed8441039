"""The ``ovis2-xinf`` console script, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from ovis2_xinf import __version__
from ovis2_xinf.local_server import console_script


def ovis2_xinf(*args: str, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("ovis2-xinf"), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env=env)


def test_version():
    done = ovis2_xinf("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ovis2-xinf {__version__}"


def test_specs_lists_every_choice_with_resolved_ids():
    done = ovis2_xinf("specs", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 12  # 11 specs, the 34B GPTQ one in Int4 and Int8
    by_choice = {(r["size"], r["format"], r["quantization"]): r for r in rows}
    assert by_choice[("34B", "gptq", "Int8")]["huggingface"] == "AIDC-AI/Ovis2-34B-GPTQ-Int8"
    assert by_choice[("1B", "pytorch", "none")]["modelscope"] == "AIDC-AI/Ovis2-1B"
    assert not any("{" in value for r in rows for value in r.values())
    table = ovis2_xinf("specs")
    assert table.returncode == 0 and "11 specs, 12 size/format/quantization choices" in table.stdout


def test_doctor_reports_an_active_registration():
    done = ovis2_xinf("doctor", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["registration_active"] is True
    assert report["registration"]["engine_choices"] == 11  # (format, size) pairs, quantizations listed in each
    assert report["xinference_supported"] is True and report["devices"]


def test_doctor_fails_when_disabled(monkeypatch):
    import os

    done = ovis2_xinf("doctor", env={**os.environ, "OVIS2_XINF_DISABLE": "1"})
    assert done.returncode == 1
    assert "registration is not active" in done.stdout


@pytest.mark.integration
def test_demo_runs_the_offline_chat_end_to_end():
    done = ovis2_xinf("demo", "--max-tokens", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Launched Ovis2 as model uid 'Ovis2'" in done.stdout
    usage = re.search(r"usage: prompt (\d+) tokens \(image included\), completion (\d+)", done.stdout)
    assert usage and int(usage.group(1)) > 64 and 1 <= int(usage.group(2)) <= 6
    assert "Server stopped." in done.stdout
