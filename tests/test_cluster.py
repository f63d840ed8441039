"""A real cluster: ``xinference-supervisor`` and two ``xinference-worker``s, one without the plugin.

The plugin-less worker runs from this same environment with ``OVIS2_XINF_DISABLE=1``, which
is what a worker without ``ovis2-xinf`` installed looks like to the supervisor (Xinference's
built-in Ovis2 family and class). One cluster serves the whole module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import httpx
import pytest

from ovis2_xinf import __version__
from ovis2_xinf.local_cluster import local_cluster
from ovis2_xinf.local_server import console_script, local_server
from ovis2_xinf.registration import DISABLE_ENV, xinference_version

TINY = Path(__file__).parents[1] / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
LAUNCH = ("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "2",
          "--model-format", "pytorch", "--model-path", str(TINY))
ACTIVE_LINE = f"ovis2-xinf {__version__} active: Ovis2 served by Ovis2NativeChatModel (Xinference {xinference_version()})"
MISSING = "Ovis2 needs the ovis2-xinf plugin on worker {}: pip install ovis2-xinf there"


def _pids_logging(text: str, needle: str) -> Counter:
    """How often each process (Xinference's ``pid:N`` field) logged a line containing ``needle``."""
    return Counter(m.group(1) for line in text.splitlines() if needle in line
                   for m in [re.search(r"\bpid:(\d+)", line)] if m)


def _doctor(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("ovis2-xinf"), "doctor", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster([None, {DISABLE_ENV: "1"}]) as running:
        yield running


@pytest.fixture(scope="module")
def with_plugin(cluster):
    return cluster.workers[0]


@pytest.fixture(scope="module")
def without_plugin(cluster):
    return cluster.workers[1]


@pytest.mark.integration
def test_doctor_reports_one_active_and_one_inactive_worker(cluster, with_plugin, without_plugin):
    done = _doctor(cluster.endpoint, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"asking {cluster.endpoint} for workers…" in done.stderr
    report = json.loads(done.stdout)
    by_address = {w["address"]: w for w in report["workers"]}
    assert sorted(by_address) == sorted([with_plugin.address, without_plugin.address])
    active, inactive = by_address[with_plugin.address], by_address[without_plugin.address]
    assert active["plugin_active"] is True and active["plugin_version"] == __version__
    assert active["engine_class"] == "Ovis2NativeChatModel"
    assert inactive["plugin_active"] is False and inactive["plugin_version"] is None
    assert active["xinference_version"] == inactive["xinference_version"] == xinference_version()
    assert report["supervisor_reports_plugin"] is True and report["all_active"] is False

    table = _doctor(cluster.endpoint)
    assert table.returncode == 1
    assert re.search(re.escape(without_plugin.address) + r"\s+MISSING", table.stdout), table.stdout
    assert re.search(re.escape(with_plugin.address) + r"\s+active", table.stdout), table.stdout
    assert f"The plugin is not active on: {without_plugin.address}." in table.stdout


@pytest.mark.integration
def test_each_process_with_the_plugin_logs_the_active_line_once(cluster, with_plugin, without_plugin):
    for node, started in ((cluster.supervisor, "Xinference supervisor"), (with_plugin, "Xinference worker")):
        text = node.log_text()
        announced = _pids_logging(text, ACTIVE_LINE)
        assert announced, f"no active line in the {node.role} log:\n{node.log_tail()}"
        assert set(announced.values()) == {1}, announced  # once per process
        assert all(" INFO " in line for line in text.splitlines() if ACTIVE_LINE in line)
        # the process serving the actor is one of them
        assert set(_pids_logging(text, started)) <= set(announced), text[-3000:]
    assert "active: Ovis2" not in without_plugin.log_text()


@pytest.mark.integration
def test_launch_pinned_to_the_plugin_less_worker_fails_naming_the_plugin(cluster, without_plugin):
    done = cluster.xinference("launch", *LAUNCH, "--worker-ip", without_plugin.address, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert MISSING.format(without_plugin.address) in output, output[-3000:]
    assert "configuration_ovis" not in output
    assert httpx.get(f"{cluster.endpoint}/v1/models", timeout=30).json()["data"] == []


@pytest.mark.integration
def test_a_launch_placed_on_the_plugin_less_worker_fails_the_same_way(cluster, without_plugin):
    # Two replicas are spread over both workers: one lands on the worker without the plugin.
    done = cluster.xinference("launch", *LAUNCH, "--replica", "2", timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert MISSING.format(without_plugin.address) in output, output[-3000:]
    assert httpx.get(f"{cluster.endpoint}/v1/models", timeout=30).json()["data"] == []


@pytest.mark.integration
def test_the_cluster_keeps_serving_ovis2_on_the_plugin_worker(cluster, with_plugin):
    done = cluster.xinference("launch", *LAUNCH, "--worker-ip", with_plugin.address, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + cluster.logs()
    assert "Model uid: Ovis2" in done.stderr
    try:
        workers = {w["work-ip"]: w for w in httpx.get(f"{cluster.endpoint}/v1/workers", timeout=30).json()}
        served = workers[with_plugin.address]["models"].values()  # keyed by replica uid
        assert [m["model_name"] for m in served] == ["Ovis2"]
        reply = httpx.post(f"{cluster.endpoint}/v1/chat/completions", timeout=300, json={
            "model": "Ovis2", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3,
        })
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["choices"][0]["message"]["content"], str)
    finally:
        cluster.xinference("terminate", "--model-uid", "Ovis2", timeout=300)


@pytest.mark.integration
def test_xinference_local_logs_the_active_line_and_doctor_sees_its_worker():
    with local_server() as server:
        announced = _pids_logging(server.log_path.read_text(errors="replace"), ACTIVE_LINE)
        assert announced and set(announced.values()) == {1}, server.log_tail()
        done = _doctor(server.endpoint, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        [worker] = json.loads(done.stdout)["workers"]
        assert worker["plugin_active"] is True and worker["plugin_version"] == __version__


def test_the_active_line_waits_for_xinference_logging_and_survives_catalog_refreshes(tmp_path):
    """Our registration runs before Xinference configures logging; a refresh publishes again."""
    code = textwrap.dedent(f"""
        import logging.config
        import xinference.model.llm as llm
        from xinference.deploy.utils import get_config_dict

        # imported: published and active, with nowhere to log yet
        config = get_config_dict("INFO", {str(tmp_path / "xinference.log")!r}, 1, 1 << 20, role="test")
        logging.config.dictConfig(config)
        llm.register_builtin_model()  # a catalog refresh publishes again
        logging.config.dictConfig(config)
    """)
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if ACTIVE_LINE in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert " INFO xinference.ovis2_xinf " in lines[0]
    assert (tmp_path / "xinference.log").read_text().count(ACTIVE_LINE) == 1  # Xinference's log file too

    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, DISABLE_ENV: "1"}, stdin=subprocess.DEVNULL, timeout=300)
    assert off.returncode == 0 and "active: Ovis2" not in off.stderr
