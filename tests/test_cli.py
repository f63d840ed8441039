"""The ``ovis2-xinf`` console script, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ovis2_xinf import __version__
from ovis2_xinf.cli import printable
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
    assert "checking registration in a fresh interpreter…" in done.stderr  # progress, off stdout
    assert report["registration_active"] is True
    assert report["registration"]["engine_choices"] == 11  # (format, size) pairs, quantizations listed in each
    assert report["xinference_supported"] is True and report["devices"]


def test_doctor_fails_when_disabled(monkeypatch):
    import os

    done = ovis2_xinf("doctor", env={**os.environ, "OVIS2_XINF_DISABLE": "1"})
    assert done.returncode == 1
    assert "registration is not active" in done.stdout


def test_printable_escapes_control_characters_and_keeps_text():
    assert printable("Hello, wörld 😀\n\tdone") == "Hello, wörld 😀\n\tdone"
    assert printable("ring\x07 esc\x1b[31m red\r\x00\x7f\x85") == "ring\\x07 esc\\x1b[31m red\\x0d\\x00\\x7f\\x85"
    # line separators, bidirectional overrides and lone surrogates (which stdout cannot encode)
    assert printable("a\u2028b\u202ec\ud800") == "a\\u2028b\\u202ec\\ud800"
    assert printable("") == ""


class _FakeXinference(BaseHTTPRequestHandler):
    """Answers ``/v1/workers`` and ``/v1/cluster/version`` like a supervisor would."""

    workers: list = []
    required_token = None
    seen_auth: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen_auth.append(self.headers.get("Authorization"))
        if self.required_token and self.headers.get("Authorization") != f"Bearer {self.required_token}":
            return self._send(401, {"detail": "Not authenticated"})
        if self.path == "/v1/workers":
            return self._send(200, self.workers)
        if self.path == "/v1/cluster/version":
            return self._send(200, {"version": "4.1.0", "full-revisionid": None})
        return self._send(404, {"detail": "Not Found"})

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_xinference():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeXinference)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeXinference.seen_auth = []
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        _FakeXinference.required_token = None
        _FakeXinference.workers = []


def _status(active, version=__version__):
    return {"plugin_active": active, "plugin_version": version if active else None,
            "engine_class": "Ovis2NativeChatModel" if active else None, "xinference_version": "4.1.0"}


def test_doctor_endpoint_reports_each_worker(fake_xinference):
    server, url = fake_xinference
    server.RequestHandlerClass.workers = [
        {"work-ip": "10.0.0.1:30001", "models": {"Ovis2": {}}, "ovis2_xinf": _status(True)},
        {"work-ip": "10.0.0.2:30001", "models": {}, "ovis2_xinf": _status(False)},
    ]
    done = ovis2_xinf("doctor", "--endpoint", url, "--json", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"asking {url} for workers…" in done.stderr
    report = json.loads(done.stdout)
    assert report["xinference_version"] == "4.1.0" and report["supervisor_reports_plugin"] is True
    assert report["all_active"] is False
    by_address = {w["address"]: w for w in report["workers"]}
    assert by_address["10.0.0.1:30001"] == {
        "address": "10.0.0.1:30001", "plugin_active": True, "plugin_version": __version__,
        "engine_class": "Ovis2NativeChatModel", "xinference_version": "4.1.0", "models": 1,
    }
    assert by_address["10.0.0.2:30001"]["plugin_active"] is False

    table = ovis2_xinf("doctor", "--endpoint", url, timeout=120)
    assert table.returncode == 1
    assert re.search(r"10\.0\.0\.1:30001\s+active\s+" + re.escape(__version__), table.stdout)
    assert re.search(r"10\.0\.0\.2:30001\s+MISSING", table.stdout)
    assert "The plugin is not active on: 10.0.0.2:30001. Install it there: pip install ovis2-xinf" in table.stdout
    assert f"asking {url} for workers…" in table.stderr

    server.RequestHandlerClass.workers = [server.RequestHandlerClass.workers[0]]
    assert ovis2_xinf("doctor", "--endpoint", url, timeout=120).returncode == 0


def test_doctor_endpoint_without_the_plugin_on_the_supervisor(fake_xinference):
    server, url = fake_xinference
    server.RequestHandlerClass.workers = [{"work-ip": "10.0.0.1:30001", "models": {}}]  # stock Xinference
    done = ovis2_xinf("doctor", "--endpoint", url, "--json", timeout=120)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["supervisor_reports_plugin"] is False
    [worker] = report["workers"]
    assert worker["plugin_active"] is None and "not active there" in worker["error"]
    table = ovis2_xinf("doctor", "--endpoint", url, timeout=120)
    assert "unknown" in table.stdout and "and on the supervisor, which reports nothing" in table.stdout


def test_doctor_endpoint_sends_the_api_key_and_explains_refusals(fake_xinference):
    server, url = fake_xinference
    server.RequestHandlerClass.workers = [{"work-ip": "10.0.0.1:30001", "models": {}, "ovis2_xinf": _status(True)}]
    server.RequestHandlerClass.required_token = "sk-test"
    refused = ovis2_xinf("doctor", "--endpoint", url, timeout=120)
    assert refused.returncode == 2
    assert "answered 401" in refused.stderr and "pass --api-key" in refused.stderr
    done = ovis2_xinf("doctor", "--endpoint", url, "--api-key", "sk-test", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Bearer sk-test" in server.RequestHandlerClass.seen_auth


def test_doctor_endpoint_unreachable():
    from ovis2_xinf.local_server import free_port

    done = ovis2_xinf("doctor", "--endpoint", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert done.returncode == 2 and "cannot ask" in done.stderr


@pytest.mark.integration
def test_demo_runs_the_offline_chat_end_to_end():
    done = ovis2_xinf("demo", "--max-tokens", "6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Launched Ovis2 as model uid 'Ovis2'" in done.stdout
    usage = re.search(r"usage: prompt (\d+) tokens \(image included\), completion (\d+)", done.stdout)
    assert usage and int(usage.group(1)) > 64 and 1 <= int(usage.group(2)) <= 6
    assert "Server stopped." in done.stdout
