"""A throwaway ``xinference-local`` on loopback, for the demo, tests and benchmarks.

Each server gets a free port, its own ``XINFERENCE_HOME`` in a temporary directory and
a closed stdin, and is stopped by PID (its whole process group) at the end. Authentication
is off unless asked for (``auth=True``): then the server starts in Xinference's first-run
state, with no account, and prints a setup token to its log (see :meth:`LocalServer.setup_token`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import httpx

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Xinference's first-run notice (xinference/api/restful_api.py, _log_setup_required_notice).
_SETUP_TOKEN = re.compile(r"Setup token: (\S+)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LocalServer:
    def __init__(self, home: Path, port: int, process: subprocess.Popen, log_path: Path, auth: bool = False):
        self.home = home
        self.port = port
        self.process = process
        self.log_path = log_path
        self.auth = auth

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def setup_token(self) -> Optional[str]:
        """The latest first-run setup token in the log (auth on, no account yet), else None."""
        found = _SETUP_TOKEN.findall(self.log_path.read_text(errors="replace")) if self.auth else []
        return found[-1] if found else None

    def xinference(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the ``xinference`` CLI against this server."""
        command = [console_script("xinference"), *args, "--endpoint", self.endpoint]
        return subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=self.env(),
        )

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["XINFERENCE_HOME"] = str(self.home)
        return env

    def launch(self, *args: str, timeout: float = 600) -> str:
        """``xinference launch`` and return the model uid, or raise with the server log."""
        done = self.xinference("launch", *args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"xinference launch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                f"--- server log ---\n{self.log_tail()}"
            )
        for line in (done.stdout + "\n" + done.stderr).splitlines():
            if "Model uid:" in line:
                return line.split("Model uid:", 1)[1].strip()
        raise RuntimeError(f"no model uid in launch output:\n{done.stdout}\n{done.stderr}")


def wait_until(ready: Callable[[], bool], exited: Callable[[], Optional[str]], what: str, timeout: float,
               logs: Callable[[], str]) -> None:
    """Poll ``ready`` until it holds; fail with the logs when a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        reason = exited()
        if reason:
            raise RuntimeError(f"{reason}:\n{logs()}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s:\n{logs()}")
        time.sleep(0.5)


def console_script(name: str) -> str:
    """The path of an installed console script of this environment (the venv's own first)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not found next to {sys.executable} or on PATH")
    return found


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


@contextlib.contextmanager
def local_server(
    extra_env: Optional[Dict[str, str]] = None, startup_timeout: float = 240.0, keep_home: bool = False,
    auth: bool = False,
) -> Iterator[LocalServer]:
    """Start ``xinference-local`` on 127.0.0.1 and stop it (and its children) after.

    ``auth=True`` keeps Xinference's authentication on; readiness is then a 401 from
    ``/v1/models`` (the API answers, with no credentials to give it yet).
    """
    home = Path(tempfile.mkdtemp(prefix="ovis2-xinf-home-"))
    port = free_port()
    env = dict(os.environ)
    env.update(
        XINFERENCE_HOME=str(home),
        XINFERENCE_MODEL_SRC=env.get("XINFERENCE_MODEL_SRC", "huggingface"),
        HF_HUB_OFFLINE="1",
        # A throwaway server on loopback: no accounts to set up, unless auth is asked for.
        XINFERENCE_AUTH_ADVANCED="1" if auth else "0",
        PYTHONUNBUFFERED="1",
        # Hub caches under this server's home too: an inherited HF_HOME (GPTQModel's tokenicer
        # sets one at import, /tmp/tokenicer_hf_home) would share downloads across servers and runs.
        HF_HOME=str(home / "hf-home"),
        HUGGINGFACE_HUB_CACHE=str(home / "huggingface"),
        HF_HUB_CACHE=str(home / "huggingface"),
        MODELSCOPE_CACHE=str(home / "modelscope"),
    )
    env.update(extra_env or {})
    log_path = home / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [console_script("xinference-local"), "--host", HOST, "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    server = LocalServer(home, port, process, log_path, auth=auth)
    ready = (200, 401) if auth else (200,)
    def exited() -> Optional[str]:
        code = process.poll()
        return None if code is None else f"xinference-local exited with {code}"

    try:
        wait_until(lambda: httpx.get(f"{server.endpoint}/v1/models", timeout=2).status_code in ready, exited,
                   "xinference-local", startup_timeout, server.log_tail)
        logger.info("xinference-local ready at %s (home %s, auth %s)", server.endpoint, home,
                    "on" if auth else "off")
        yield server
    finally:
        _stop(process)
        log.close()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
