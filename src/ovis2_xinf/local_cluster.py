"""A throwaway Xinference cluster on loopback: one ``xinference-supervisor`` and its workers.

For the cluster tests (a worker with the plugin beside one without): every node is its
own process group with its own ``XINFERENCE_HOME`` in a temporary directory, a free
port, a closed stdin and authentication off, and is stopped by PID at the end, workers
first. Each node's stdout and stderr (where Xinference logs) go to ``<home>/node.log``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import httpx

from .local_server import HOST, _stop, console_script, free_port, wait_until

logger = logging.getLogger(__name__)


@dataclass
class Node:
    role: str  # "supervisor" or "worker"
    address: str  # the supervisor's or worker's actor address, host:port
    home: Path
    process: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class LocalCluster:
    def __init__(self, port: int, supervisor: Node, env: Dict[str, str]):
        self.port = port
        self.supervisor = supervisor
        self.workers: List[Node] = []
        self._env = env

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def nodes(self) -> List[Node]:
        return [self.supervisor, *self.workers]

    def logs(self) -> str:
        return "\n".join(f"--- {n.role} {n.address} ---\n{n.log_tail()}" for n in self.nodes)

    def xinference(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the ``xinference`` CLI against the supervisor."""
        return subprocess.run(
            [console_script("xinference"), *args, "--endpoint", self.endpoint], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, env={**self._env, "XINFERENCE_HOME": str(self.supervisor.home)},
        )

    def worker_addresses(self) -> List[str]:
        response = httpx.get(f"{self.endpoint}/v1/workers", timeout=30)
        response.raise_for_status()
        return sorted(entry["work-ip"] for entry in response.json())


def _start(role: str, args: Sequence[str], env: Dict[str, str], address: str) -> Node:
    home = Path(tempfile.mkdtemp(prefix=f"ovis2-xinf-{role}-"))
    log_path = home / "node.log"
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [console_script(f"xinference-{role}"), *args], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env={**env, "XINFERENCE_HOME": str(home)}, start_new_session=True,
        )
    return Node(role, address, home, process, log_path)


def _wait(cluster: LocalCluster, ready, what: str, timeout: float) -> None:
    def exited() -> Optional[str]:
        for node in cluster.nodes:
            if node.process.poll() is not None:
                return f"{node.role} {node.address} exited with {node.process.returncode}"
        return None

    wait_until(ready, exited, what, timeout, cluster.logs)


@contextlib.contextmanager
def local_cluster(
    worker_envs: Sequence[Optional[Dict[str, str]]] = (None,),
    extra_env: Optional[Dict[str, str]] = None,
    startup_timeout: float = 300.0,
    keep_homes: bool = False,
) -> Iterator[LocalCluster]:
    """Start a supervisor and one worker per entry of ``worker_envs`` (extra variables for
    that worker, e.g. ``{"OVIS2_XINF_DISABLE": "1"}``), all on 127.0.0.1; stop them after."""
    env = dict(os.environ)
    env.update(
        XINFERENCE_MODEL_SRC=env.get("XINFERENCE_MODEL_SRC", "huggingface"),
        HF_HUB_OFFLINE="1",
        # A throwaway cluster on loopback: no accounts to set up.
        XINFERENCE_AUTH_ADVANCED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env or {})
    port, supervisor_port = free_port(), free_port()
    supervisor = _start(
        "supervisor", ["--host", HOST, "--port", str(port), "--supervisor-port", str(supervisor_port)], env,
        f"{HOST}:{supervisor_port}",
    )
    cluster = LocalCluster(port, supervisor, env)
    try:
        _wait(cluster, lambda: httpx.get(f"{cluster.endpoint}/v1/models", timeout=2).status_code == 200,
              "xinference-supervisor", startup_timeout)
        for extra in worker_envs:
            worker_port = free_port()
            cluster.workers.append(_start(
                "worker", ["-e", cluster.endpoint, "--host", HOST, "--worker-port", str(worker_port)],
                {**env, **(extra or {})}, f"{HOST}:{worker_port}",
            ))
        expected = sorted(w.address for w in cluster.workers)
        _wait(cluster, lambda: cluster.worker_addresses() == expected, "xinference-worker", startup_timeout)
        logger.info("cluster ready at %s: workers %s", cluster.endpoint, expected)
        yield cluster
    finally:
        # Workers first (together), then the supervisor they report to.
        for group in (cluster.workers, [cluster.supervisor]):
            for node in group:
                if node.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.process.pid, signal.SIGTERM)
            for node in group:
                _stop(node.process)
        if not keep_homes:
            for node in cluster.nodes:
                shutil.rmtree(node.home, ignore_errors=True)
