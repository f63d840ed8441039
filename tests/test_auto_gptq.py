"""auto-gptq installed next to the gptq extra: GPTQ still loads through GPTQModel, nothing imports it.

auto-gptq 0.7.1 (the newest on PyPI) installs but does not import beside transformers 5; users
upgrading an older Xinference environment may still have it. The wheel goes into a throwaway
directory on PYTHONPATH, with a line at the top of its package that records any import of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from conftest import FIXTURES
from ovis2_xinf.local_server import console_script, local_server

pytestmark = pytest.mark.integration
VERSION = "0.7.1"


@pytest.fixture(scope="module")
def auto_gptq_dir(tmp_path_factory) -> Path:
    """auto-gptq's wheel from the package index, installed without its dependencies."""
    root = tmp_path_factory.mktemp("auto-gptq")
    wheels, target = root / "wheels", root / "site"
    for command in (["download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), f"auto-gptq=={VERSION}"],
                    ["install", "--no-deps", "--no-index", "--target", str(target), "--find-links", str(wheels),
                     f"auto-gptq=={VERSION}"]):
        done = subprocess.run([sys.executable, "-m", "pip", *command, "--quiet", "--disable-pip-version-check"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    package = target / "auto_gptq" / "__init__.py"
    probe = ('import os as _os\nif _os.environ.get("AUTO_GPTQ_IMPORT_LOG"):\n'
             '    open(_os.environ["AUTO_GPTQ_IMPORT_LOG"], "a").write(str(_os.getpid()) + "\\n")\n')
    package.write_text(probe + package.read_text())
    return target


def _env(site: Path, log: Path) -> dict:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "AUTO_GPTQ_IMPORT_LOG": str(log)}


def test_auto_gptq_really_fails_to_import_here(auto_gptq_dir, tmp_path):
    env = {**os.environ, **_env(auto_gptq_dir, tmp_path / "imports.log")}
    done = subprocess.run([sys.executable, "-c", "import auto_gptq"], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode != 0
    assert "cannot import name 'no_init_weights' from 'transformers.modeling_utils'" in done.stderr


def test_gptq_launch_uses_gptqmodel_and_never_imports_auto_gptq(auto_gptq_dir, tmp_path):
    log = tmp_path / "imports.log"
    with local_server(extra_env=_env(auto_gptq_dir, log)) as server:
        uid = server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
                            "--model-format", "gptq", "--quantization", "Int4",
                            "--model-path", str(FIXTURES / "tiny-ovis2-gptq-int4"))
        client = OpenAI(base_url=f"{server.endpoint}/v1", api_key="not-needed", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=uid, messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
        assert "GPTQ kernel for cpu: " in server.log_tail(2000)  # GPTQModel's kernel was chosen
    assert not log.exists(), f"auto_gptq was imported by pids {log.read_text().split()}"


def test_doctor_reports_auto_gptq_as_installed_not_used(auto_gptq_dir, tmp_path):
    env = {**os.environ, **_env(auto_gptq_dir, tmp_path / "imports.log")}
    done = subprocess.run([console_script("ovis2-xinf"), "doctor", "--json"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)
    report = json.loads(done.stdout)
    line = report["auto_gptq"]
    assert line.startswith(f"installed ({VERSION}), not used: ImportError: cannot import name 'no_init_weights'")
    clean = subprocess.run([console_script("ovis2-xinf"), "doctor", "--json"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=600)
    assert json.loads(clean.stdout)["auto_gptq"] == "not installed"
