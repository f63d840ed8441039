"""The README's "Use it with Xinference" section, run as written, against Xinference with auth on.

The bash block is run verbatim by bash; only the port (a free one instead of 9997) and, for the
one launch run here, the checkpoint path (the bundled tiny checkpoint instead of /models/Ovis2-2B)
are substituted. The hub launches need a hub stand-in: :func:`launch_commands` hands them out for a
test that has one. Server, CLI and client get their own XINFERENCE_HOME and HOME in a temp dir.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import psutil
import pytest
from openai import AuthenticationError, OpenAI

from conftest import CASES_DIR, TINY
from ovis2_xinf.loader import load_tokenizer
from ovis2_xinf.local_server import HOST, free_port

pytestmark = pytest.mark.integration

README = Path(__file__).parents[1] / "README.md"
SECTION = "## Use it with Xinference"
README_PORT = "9997"
README_MODEL_PATH = "/models/Ovis2-2B"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


# --- the README, taken apart ----------------------------------------------------------------

def section_blocks(language: str) -> List[str]:
    """The fenced blocks of one language in the README's "Use it with Xinference" section."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.S | re.M)


def bash_block() -> str:
    blocks = section_blocks("bash")
    assert len(blocks) == 1, f"expected one bash block in {SECTION!r}, found {len(blocks)}"
    return blocks[0]


def python_block() -> str:
    blocks = section_blocks("python")
    assert len(blocks) == 1, f"expected one python block in {SECTION!r}, found {len(blocks)}"
    return blocks[0]


def commands(block: str) -> List[str]:
    """The block's commands as a shell reads them: continued lines joined (kept verbatim, with
    their backslash-newlines), blank and comment lines dropped."""
    found, current = [], ""
    for line in block.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line
        if not line.rstrip("\n").endswith("\\"):
            found.append(current.rstrip("\n"))
            current = ""
    assert not current, f"unterminated continuation: {current!r}"
    return found


def is_launch(command: str) -> bool:
    return command.startswith("xinference launch ")


def setup_commands() -> List[str]:
    """Everything in the bash block but the launches, in order (start, setup, login, API key)."""
    return [c for c in commands(bash_block()) if not is_launch(c)]


def launch_commands() -> List[str]:
    """The ``xinference launch`` commands, in README order (8B pytorch, 2B Int4, 34B Int8, --model-path)."""
    return [c for c in commands(bash_block()) if is_launch(c)]


def with_port(text: str, port: int) -> str:
    """``text`` with the README's port 9997 replaced by ``port`` (and it had to be there)."""
    replaced, count = re.subn(rf"\b{README_PORT}\b", str(port), text)
    assert count, f"port {README_PORT} not in {text!r}"
    return replaced


# --- running it -----------------------------------------------------------------------------

def readme_env(root: Path) -> Dict[str, str]:
    """A user's environment, moved into ``root``: own HOME and XINFERENCE_HOME, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("XINFERENCE_AUTH_ADVANCED", "XINFERENCE_ENDPOINT")}
    (root / "home").mkdir()
    env.update(
        HOME=str(root / "home"),
        XINFERENCE_HOME=str(root / "xinference-home"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        XINFERENCE_MODEL_SRC=env.get("XINFERENCE_MODEL_SRC", "huggingface"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


class ReadmeRun:
    """The README's shell session: its commands run by one bash, whose process group keeps the
    background ``xinference-local`` after bash exits, so the group is what gets stopped."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.env = readme_env(root)
        self.process: Optional[subprocess.Popen] = None
        self.exported: Dict[str, str] = {}
        self.output = ""

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def server_log(self, lines: int = 80) -> str:
        try:
            return "\n".join((self.root / "xinference-local.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def run(self, script_commands: List[str], timeout: float = 420) -> None:
        exported = self.root / "exported.json"
        script = "\n".join([
            "set -e -o pipefail",
            "trap 'echo \"README command failed ($?): $BASH_COMMAND\" >&2' ERR",
            *script_commands,
            # test harness: hand the session's variables back
            f"python3 -c 'import json, os; print(json.dumps(dict(os.environ)))' > {shlex.quote(str(exported))}",
        ]) + "\n"
        (self.root / "readme.sh").write_text(script)
        self.process = subprocess.Popen(
            ["bash", str(self.root / "readme.sh")], cwd=self.root, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            self.output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.output = f"(bash still running after {timeout}s)"
        if self.process.returncode != 0:
            raise AssertionError(
                f"README commands failed ({self.process.returncode}):\n{self.output[-6000:]}\n"
                f"--- server log ---\n{self.server_log()}")
        self.exported = json.loads(exported.read_text())

    def stop(self, grace: float = 20.0) -> None:
        """Stop the session's process group (bash is gone by now; the server and its children
        are what is left of it): SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()  # reap bash, if it was still running
                if not group_alive(self.process.pid):
                    return
                time.sleep(0.2)
        raise RuntimeError(f"process group {self.process.pid} survived SIGKILL")


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies awaiting their reaper do not count)."""
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# --- the test -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    run = ReadmeRun(tmp_path_factory.mktemp("readme-auth"), free_port())
    [from_disk] = [c for c in launch_commands() if README_MODEL_PATH in c]
    setup = setup_commands()
    # the server's port, and the CLI's endpoint the curl lines and launches share
    assert sum(README_PORT in c for c in setup) >= 2, setup
    script = [with_port(c, run.port) if README_PORT in c else c for c in setup]
    script.append(from_disk.replace(README_MODEL_PATH, shlex.quote(str(TINY))))
    try:
        run.run(script)
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def api_key(readme) -> str:
    key = readme.exported.get("XINFERENCE_API_KEY", "")
    assert key.startswith("xf-"), f"no API key exported: {key!r}\n{readme.output[-3000:]}"
    return key


@pytest.fixture(scope="module")
def client(readme, api_key) -> OpenAI:
    return OpenAI(base_url=f"{readme.endpoint}/v1", api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def expected(cases):
    tokenizer = load_tokenizer(TINY)
    return {name: tokenizer.decode(case["greedy_ids"], skip_special_tokens=True)
            for name, case in cases["cases"].items()}


def test_readme_commands_ran_and_kept_to_the_temp_home(readme, api_key):
    assert "Model uid: Ovis2" in readme.output, readme.output[-3000:]
    home, xhome = Path(readme.env["HOME"]), Path(readme.env["XINFERENCE_HOME"])
    # The server's accounts and the CLI's login both live in XINFERENCE_HOME/auth, the login
    # under the sha256 of the endpoint string; nothing of Xinference's under HOME.
    login = xhome / "auth" / hashlib.sha256(readme.exported["XINFERENCE_ENDPOINT"].encode()).hexdigest()
    assert login.is_file() and (xhome / "auth" / "auth.db").is_file()
    assert not (home / ".xinference").exists()
    # The setup token was used up: setup is closed.
    status = httpx.get(f"{readme.endpoint}/v1/admin/setup/status", timeout=30).json()
    assert status["needs_setup"] is False


def test_no_key_is_401(readme):
    bare = httpx.get(f"{readme.endpoint}/v1/models", timeout=30)
    assert bare.status_code == 401 and bare.json()["detail"] == "Could not validate credentials"
    chat = httpx.post(f"{readme.endpoint}/v1/chat/completions", timeout=30,
                      json={"model": "Ovis2", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 401
    anonymous = OpenAI(base_url=f"{readme.endpoint}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(AuthenticationError):
        anonymous.models.list()


def test_api_key_is_refused_by_admin_and_management_endpoints(readme, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    refused = {
        "create key": httpx.post(f"{readme.endpoint}/v1/admin/keys", json={"name": "more"}, headers=headers),
        "list keys": httpx.get(f"{readme.endpoint}/v1/admin/keys", headers=headers),
        "list users": httpx.get(f"{readme.endpoint}/v1/admin/users", headers=headers),
        "terminate": httpx.delete(f"{readme.endpoint}/v1/models/Ovis2", headers=headers),
    }
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403)
    assert "API keys can only access model query and inference endpoints" in refused["create key"].text
    # and the model is still there
    listed = httpx.get(f"{readme.endpoint}/v1/models", headers=headers, timeout=30)
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == ["Ovis2"]


def stream_text(client: OpenAI, **request) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in
                   client.chat.completions.create(stream=True, **request) if chunk.choices)


def test_text_chat_with_the_api_key(client, expected):
    request = dict(model="Ovis2", messages=[{"role": "user", "content": "hello, who are you?"}], max_tokens=8, **GREEDY)
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].message.content == expected["text_only"]
    assert stream_text(client, **request) == expected["text_only"]


def test_image_chat_with_the_api_key(client, expected):
    request = dict(model="Ovis2", max_tokens=8, **GREEDY, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(CASES_DIR / "images" / "wide.png")}},
        {"type": "text", "text": "Describe the image."}]}])
    reply = client.chat.completions.create(**request)
    assert reply.choices[0].message.content == expected["single_wide"]
    assert stream_text(client, **request) == expected["single_wide"]


def test_readme_python_example_runs(readme, api_key):
    """The README's Python block, verbatim but for the port and its example image (a data: URL)."""
    code = with_port(python_block(), readme.port)
    assert code.count("https://example.com/cat.jpg") == 1
    code = code.replace("https://example.com/cat.jpg", data_url(CASES_DIR / "images" / "square.png"))
    done = subprocess.run([sys.executable, "-c", code], env=readme.exported, cwd=readme.root, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
