"""Local stand-ins for the Hugging Face Hub and ModelScope HTTP APIs.

No machine of this project reaches either hub, yet Xinference's download path
(``CacheManager`` -> ``retry_snapshot_download`` -> the SDK's ``snapshot_download``) is worth
testing for real. Two small servers answer the endpoints the installed SDKs call, from local
directories served under real repo ids, so a child process started with
:attr:`HubStandins.env` downloads through unchanged SDK code, and tests can assert which repo,
revision and files each hub was asked for.

What the SDKs call (read from huggingface_hub 1.16 and modelscope 1.40, a shim over
modelscope-hub 0.5):

* Hugging Face: ``GET /api/models/{id}/revision/main`` (id, sha, siblings), then per file
  ``HEAD`` + ``GET /{id}/resolve/{sha}/{file}``, needing ``X-Repo-Commit``, an ``ETag`` and a
  size. LFS files answer ``302`` with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and an
  absolute ``Location``, as the real Hub does. Errors carry ``X-Error-Code``.
* ModelScope: revision ``None`` is sent as ``master`` with no revision lookup;
  ``GET /api/v1/models/{id}/repo/files?Revision=master&Recursive=True``, then per file
  ``GET /api/v1/models/{id}/repo?Revision=master&FilePath=...`` (checked against the listed
  Sha256), plus one ``GET /api/v1/repos/internalAccelerationInfo`` Alibaba-cloud probe.
  ``model_file_download`` (Xinference's gguf path) first asks ``GET .../revisions`` and takes
  the newest tag older than the SDK's release, else ``master``; no tags are served here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Set
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

log = logging.getLogger(__name__)

HF, MS = "huggingface", "modelscope"
HF_BRANCH, MS_BRANCH = "main", "master"
# What the Hub's default .gitattributes keeps in LFS, among the files a checkpoint has.
LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx", ".model"}


def fake_commit(repo_id: str) -> str:
    """The fixed 40-hex "commit" a repo is served at: stable across runs, so tests can name it."""
    return hashlib.sha1(f"hub-standin:{repo_id}".encode()).hexdigest()


@dataclass(frozen=True)
class HubRequest:
    """One answered request: enough to say what was downloaded, from which hub, at which revision."""

    hub: str
    method: str
    endpoint: str  # model_info resolve lfs | repo_files repo_file repo_info revisions probe | unknown
    repo_id: Optional[str]
    revision: Optional[str]
    file: Optional[str]
    status: int


class RequestLog:
    """Thread-safe record of every request, appended to by both servers' handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: List[HubRequest] = []

    def add(self, item: HubRequest) -> None:
        with self._lock:
            self._items.append(item)

    def all(self, hub: Optional[str] = None) -> List[HubRequest]:
        with self._lock:
            return [r for r in self._items if hub is None or r.hub == hub]

    def repos(self, hub: str) -> Set[str]:
        """Repo ids the hub was asked about, served or not."""
        return {r.repo_id for r in self.all(hub) if r.repo_id}

    def revisions(self, hub: str, repo_id: str) -> Set[str]:
        return {r.revision for r in self.all(hub) if r.repo_id == repo_id and r.revision}

    def files(self, hub: str, repo_id: str) -> Set[str]:
        """Files whose bytes were sent: not a HEAD, a redirect or an error."""
        return {r.file for r in self.all(hub) if r.repo_id == repo_id and r.file and r.method == "GET"
                and r.status in (200, 206) and r.endpoint in ("lfs", "resolve", "repo_file")}


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    sha256: str
    git_sha1: str  # the git blob id: the Hub's ETag for a file kept in git itself
    lfs: bool


class _Repo:
    """A local directory as a hub repo: every file under it, hashed once up front."""

    def __init__(self, repo_id: str, root: Path) -> None:
        self.commit, self.files = fake_commit(repo_id), {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                self.files[p.relative_to(root).as_posix()] = _File(
                    p, len(data), hashlib.sha256(data).hexdigest(),
                    hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), p.suffix in LFS_SUFFIXES)

    def knows(self, revision: str, branch: str) -> bool:
        return revision in (branch, self.commit)


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing: parsing, the request log, bodies (files with Range), quiet logging."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' pooled sessions expect
    hub = ""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.method, self.query = method, {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.note: Dict[str, Optional[str]] = {"endpoint": "unknown", "repo_id": None, "revision": None, "file": None}
        try:
            self.route(url.path)
        except Exception:  # a bug here must fail the client with a 500, not hang it
            log.exception("%s stand-in failed on %s", self.hub, self.path)
            self.reply(500, {"error": "stand-in error"})

    def route(self, path: str) -> None:
        raise NotImplementedError

    @property
    def repos(self) -> Dict[str, _Repo]:
        return self.server.repos  # type: ignore[attr-defined]

    def reply(self, status: int, body: object = b"", headers: Optional[Dict[str, str]] = None) -> None:
        """Send JSON, bytes or a repo file; a file honours ``Range: bytes=a-[b]`` (both SDKs resume)."""
        headers, data, start = dict(headers or {}), b"", 0
        if isinstance(body, _File):
            end = body.size - 1
            a, dash, b = self.headers.get("Range", "").partition("=")[2].split(",")[0].partition("-")
            if dash:
                start, end = int(a or 0), min(int(b) if b else end, end)
                if start >= body.size:
                    return self.reply(416, b"", {"Content-Range": f"bytes */{body.size}"})
                status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{body.size}"
            headers.update({"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
            length = end - start + 1
        else:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if not isinstance(body, bytes):
                headers["Content-Type"] = "application/json"
            length = len(data)
        self.server.log.add(HubRequest(self.hub, self.method, status=status, **self.note))  # type: ignore[attr-defined]
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.method == "GET" and isinstance(body, _File):
            with body.path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(length)
        if self.method == "GET":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s stand-in: " + format, self.hub, *args)


class _HfHandler(_Handler):
    hub = HF

    def route(self, path: str) -> None:
        if path.startswith("/api/models/"):
            repo_id, _, rev = path[len("/api/models/"):].partition("/revision/")
            self.note.update(endpoint="model_info", repo_id=repo_id, revision=unquote(rev) or HF_BRANCH)
        elif "/resolve/" in path:
            repo_id, _, tail = path[1:].partition("/resolve/")
            rev, _, name = tail.partition("/")
            self.note.update(endpoint="resolve", repo_id=repo_id, revision=unquote(rev), file=unquote(name))
        elif path == "/_lfs":  # where LFS files redirect to, standing in for the Hub's CDN
            q = self.query
            self.note.update(endpoint="lfs", repo_id=q.get("repo"), revision=q.get("rev"), file=q.get("file"))
        else:
            return self.reply(404, {"error": "Sorry, we can't find the page you are looking for."})
        repo_id, rev, name = self.note["repo_id"] or "", self.note["revision"] or "", self.note["file"] or ""
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error("RepoNotFound", "Repository not found")
        if not repo.knows(rev, HF_BRANCH):
            return self._error("RevisionNotFound", f"Invalid rev id: {rev}")
        if self.note["endpoint"] == "model_info":
            return self.reply(200, {
                "_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": repo.commit, "private": False, "gated": False, "disabled": False, "tags": [],
                "lastModified": "2025-01-01T00:00:00.000Z", "siblings": [{"rfilename": n} for n in repo.files]})
        f = repo.files.get(name)
        if f is None:
            return self._error("EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
        if self.note["endpoint"] == "lfs":
            return self.reply(200, f, {"ETag": f'"{f.sha256}"'})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.git_sha1}"'}
        if not f.lfs:
            return self.reply(200, f, headers)
        host, port = self.server.server_address[:2]
        target = urlencode({"repo": repo_id, "rev": repo.commit, "file": name}, quote_via=quote)
        self.reply(302, b"", {**headers, "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                              "Location": f"http://{host}:{port}/_lfs?{target}"})

    def _error(self, code: str, message: str, extra: Optional[Dict[str, str]] = None) -> None:
        """The Hub's error shape: huggingface_hub picks its exception type by ``X-Error-Code``."""
        self.reply(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})


def _ms_body(data: object, code: int = 200, message: str = "success") -> Dict[str, object]:
    """ModelScope's envelope around every ``/api/v1`` answer, success or not."""
    return {"Code": code, "Data": data, "Message": message, "RequestId": uuid.uuid4().hex, "Success": code == 200}


class _MsHandler(_Handler):
    hub = MS
    ENDPOINTS = {"": "repo_info", "repo/files": "repo_files", "repo": "repo_file", "revisions": "revisions"}

    def route(self, path: str) -> None:
        if path == "/api/v1/repos/internalAccelerationInfo":
            # Outside Alibaba Cloud the answer names no region-query address, so nothing else is probed.
            self.note.update(endpoint="probe")
            return self.reply(200, _ms_body({"InternalRegionQueryAddress": ""}))
        parts = path.split("/")  # "", api, v1, models, owner, name, *rest
        if parts[1:4] != ["api", "v1", "models"] or len(parts) < 6:
            return self.reply(404, _ms_body(None, 404, "Not Found"))
        repo_id, rest = "/".join(parts[4:6]), "/".join(parts[6:])
        rev = self.query.get("Revision", MS_BRANCH) if rest.startswith("repo") else None
        self.note.update(endpoint=self.ENDPOINTS.get(rest, "unknown"), repo_id=repo_id, revision=rev,
                         file=self.query.get("FilePath") if rest == "repo" else None)
        repo = self.repos.get(repo_id)
        if repo is None:  # the real server's message, which the SDK turns into "Model does not exist."
            return self.reply(404, _ms_body(None, 404, "模型不存在"))
        if rest == "":
            return self.reply(200, _ms_body({"Id": repo_id, "Path": parts[4], "Name": parts[5]}))
        if rest == "revisions":
            branch = {"Revision": MS_BRANCH, "CommitId": repo.commit, "CreatedAt": 1735689600}
            return self.reply(200, _ms_body({"RevisionMap": {"Branches": [branch], "Tags": []}}))
        if rev is None or rest not in self.ENDPOINTS or not repo.knows(rev, MS_BRANCH):
            return self.reply(404, _ms_body(None, 404, f"{rest} not found at revision {rev}"))
        if rest == "repo/files":
            return self.reply(200, _ms_body({"Files": self._listing(repo, self.query.get("Root", ""))}))
        f = repo.files.get(self.note["file"] or "")
        if f is None:
            return self.reply(404, _ms_body(None, 404, "file not found"))
        self.reply(200, f, {"ETag": f'"{f.sha256}"', "X-Repo-Commit": repo.commit})

    @staticmethod
    def _listing(repo: _Repo, root: str) -> List[Dict[str, object]]:
        """Recursive ``repo/files`` entries under ``root``: folders as "tree", files as "blob"."""
        prefix = root.strip("/") + "/" if root.strip("/") else ""
        dirs = sorted({"/".join(n.split("/")[:i]) for n in repo.files for i in range(1, n.count("/") + 1)})
        out: List[Dict[str, object]] = [{"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0}
                                        for d in dirs if d.startswith(prefix)]
        return out + [{"Name": n.rsplit("/", 1)[-1], "Path": n, "Type": "blob", "Size": f.size, "Sha256": f.sha256,
                       "IsLFS": f.lfs, "Id": f.git_sha1, "Revision": repo.commit}
                      for n, f in repo.files.items() if n.startswith(prefix)]


@dataclass
class HubStandins:
    """What a test gets: both base URLs, the env a child process needs, and the request log."""

    hf_url: str
    ms_url: str
    log: RequestLog

    @property
    def env(self) -> Dict[str, str]:
        """Set before the child starts: huggingface_hub reads ``HF_ENDPOINT`` into constants at
        import. The offline flags are pinned to "0" (an inherited "1" would skip the servers).
        ``MODELSCOPE_ENDPOINT`` is what modelscope-hub reads; ``MODELSCOPE_DOMAIN`` (ignored
        once that is set) aims the old SDK's https-only URL helpers here too, so they fail
        locally instead of reaching modelscope.cn."""
        return {
            "HF_ENDPOINT": self.hf_url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "MODELSCOPE_ENDPOINT": self.ms_url, "MODELSCOPE_DOMAIN": urlsplit(self.ms_url).netloc,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }


def _serve(handler: type, repos: Dict[str, _Repo], request_log: RequestLog, stack: ExitStack) -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    server.repos, server.log = repos, request_log  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), name=f"{handler.hub}-standin", daemon=True).start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    host, port = server.server_address[:2]
    log.info("%s stand-in on http://%s:%s serving %s", handler.hub, host, port, sorted(repos))
    return f"http://{host}:{port}"


@contextmanager
def hub_standins(repos: Mapping[str, Path], modelscope_repos: Optional[Mapping[str, Path]] = None,
                 ) -> Iterator[HubStandins]:
    """Serve ``repos`` (repo id -> directory) on a Hugging Face stand-in and ``modelscope_repos``
    (by default the same: ModelScope mirrors the AIDC-AI repos) on a ModelScope one, each on a
    free 127.0.0.1 port, for the life of the ``with`` block."""
    request_log = RequestLog()
    hf = {rid: _Repo(rid, Path(p)) for rid, p in repos.items()}
    ms = hf if modelscope_repos is None else {rid: _Repo(rid, Path(p)) for rid, p in modelscope_repos.items()}
    with ExitStack() as stack:
        yield HubStandins(_serve(_HfHandler, hf, request_log, stack), _serve(_MsHandler, ms, request_log, stack),
                          request_log)
