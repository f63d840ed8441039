"""The hub stand-ins drive the real SDKs and Xinference's real cache manager.

Each download runs in a child process started with ``hubs.env``, as xinference-local would
be: huggingface_hub fixes its endpoint at import, so it cannot be pointed anywhere later.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from hubs import HF, MS, HubStandins, fake_commit, hub_standins

TINY = Path(__file__).parents[1] / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
REPO = "AIDC-AI/Ovis2-2B"
GPTQ_REPO = "AIDC-AI/Ovis2-34B-GPTQ-Int8"
TINY_FILES = sorted(p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file())


@pytest.fixture
def hubs():
    with hub_standins({REPO: TINY, GPTQ_REPO: TINY}) as standins:
        yield standins


def run_child(code: str, hubs: HubStandins, tmp: Path, **extra: str) -> dict:
    """Run ``code`` in a fresh interpreter with the stand-ins' env and caches under ``tmp``;
    its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MODELSCOPE_"))}
    env.update(hubs.env, HF_HOME=str(tmp / "hf-home"), MODELSCOPE_HOME=str(tmp / "ms-home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(Path(__file__).parent), **extra)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_tree(downloaded: str) -> None:
    root = Path(downloaded)
    got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert got == TINY_FILES
    for name in TINY_FILES:
        assert (root / name).read_bytes() == (TINY / name).read_bytes(), name


def test_huggingface_snapshot_download(hubs: HubStandins, tmp_path: Path) -> None:
    out = run_child(
        "import json; from huggingface_hub import snapshot_download\n"
        f"print(json.dumps(snapshot_download({REPO!r})))", hubs, tmp_path, HF_HUB_CACHE=str(tmp_path / "hf"))
    sha = fake_commit(REPO)
    assert out == str(tmp_path / "hf" / "models--AIDC-AI--Ovis2-2B" / "snapshots" / sha)
    assert_same_tree(out)
    assert (tmp_path / "hf" / "models--AIDC-AI--Ovis2-2B" / "refs" / "main").read_text() == sha
    # The branch is asked for once; every file is then fetched at the commit it resolved to.
    info = [r for r in hubs.log.all(HF) if r.endpoint == "model_info"]
    assert [(r.repo_id, r.revision, r.status) for r in info] == [(REPO, "main", 200)]
    assert {r.revision for r in hubs.log.all(HF) if r.file} == {sha}
    assert hubs.log.files(HF, REPO) == set(TINY_FILES)
    assert any(r.endpoint == "lfs" and r.file == "model.safetensors" for r in hubs.log.all(HF))
    assert hubs.log.all(MS) == []


def test_modelscope_snapshot_download(hubs: HubStandins, tmp_path: Path) -> None:
    out = run_child(
        "import json; from modelscope.hub.snapshot_download import snapshot_download\n"
        f"print(json.dumps(snapshot_download({REPO!r})))", hubs, tmp_path, MODELSCOPE_CACHE=str(tmp_path / "ms"))
    # revision=None is sent as "master", and the snapshot is named after it, not a commit.
    assert out == str(tmp_path / "ms" / "models" / "AIDC-AI--Ovis2-2B" / "snapshots" / "master")
    assert_same_tree(out)
    assert hubs.log.revisions(MS, REPO) == {"master"}
    assert [r.endpoint for r in hubs.log.all(MS) if r.endpoint not in ("repo_file", "probe")] == ["repo_files"]
    assert hubs.log.files(MS, REPO) == set(TINY_FILES)
    assert hubs.log.repos(HF) == set()


def test_unknown_repo_fails_like_the_real_hubs(hubs: HubStandins, tmp_path: Path) -> None:
    out = run_child(
        "import json, huggingface_hub, requests\n"
        "from modelscope.hub.snapshot_download import snapshot_download as ms\n"
        "errors = {}\n"
        "for hub, call in (('hf', huggingface_hub.snapshot_download), ('ms', ms)):\n"
        "    try:\n"
        "        call('AIDC-AI/Ovis2-3B')\n"
        "    except Exception as e:\n"
        "        errors[hub] = [type(e).__name__, type(e.__cause__).__name__, str(e)]\n"
        "print(json.dumps(errors))", hubs, tmp_path)
    assert out["hf"][0] == "RepositoryNotFoundError"
    assert out["ms"][:2] == ["HTTPError", "NotExistError"] and "Model does not exist" in out["ms"][2]
    for hub in (HF, MS):
        assert {(r.repo_id, r.status) for r in hubs.log.all(hub) if r.repo_id} == {("AIDC-AI/Ovis2-3B", 404)}


XINFERENCE_CACHE = """
import json, os
from xinference.model.llm.llm_family import match_llm
from xinference.model.llm.cache_manager import LLMCacheManager
out = {}
for hub in ("huggingface", "modelscope"):
    for args in (("pytorch", 2, "none"), ("gptq", 34, "Int8"), ("pytorch", 1, "none")):
        family = match_llm("Ovis2", *args, download_hub=hub)
        key = hub + ":" + family.model_specs[0].model_id
        try:
            path = LLMCacheManager(family).cache()
        except Exception as e:
            out[key] = {"error": type(e).__name__ + ": " + str(e)}
            continue
        # The cache dir (symlinks into the SDK's cache) does not name the hub: move it
        # aside so the next hub downloads too, and so the test can look at both.
        kept = path + "-" + hub
        os.rename(path, kept)
        out[key] = {"cache": kept, "source": os.path.realpath(os.path.join(kept, "config.json"))}
print(json.dumps(out))
"""


def test_xinference_cache_manager_downloads_from_the_chosen_hub(hubs: HubStandins, tmp_path: Path) -> None:
    home = tmp_path / "xinf"
    out: Dict[str, dict] = run_child(XINFERENCE_CACHE, hubs, tmp_path, XINFERENCE_HOME=str(home))
    # Xinference points each SDK's cache under its home; the files come from the hub asked for.
    sources = {HF: home / "huggingface" / "models--AIDC-AI--Ovis2-2B",
               MS: home / "modelscope" / "models" / "AIDC-AI--Ovis2-2B" / "snapshots" / "master"}
    for hub in (HF, MS):
        assert out[f"{hub}:{REPO}"]["source"].startswith(str(sources[hub]) + os.sep), out
        for repo in (REPO, GPTQ_REPO):
            assert_same_tree(out[f"{hub}:{repo}"]["cache"])
            assert hubs.log.files(hub, repo) == set(TINY_FILES)
        # A repo the hub lacks: retry_snapshot_download asks XINFERENCE_DOWNLOAD_MAX_ATTEMPTS (3) times,
        # and our registration's message names the repo, revision and hub.
        revision = "main" if hub == HF else "master"
        assert out[f"{hub}:AIDC-AI/Ovis2-1B"]["error"].startswith(
            f"RuntimeError: Could not download Ovis2 1B pytorch: repo AIDC-AI/Ovis2-1B at revision {revision} "
            f"(the default branch) from {hub}"), out
        missing = [r for r in hubs.log.all(hub) if r.repo_id == "AIDC-AI/Ovis2-1B"]
        assert len(missing) == 3 and {r.status for r in missing} == {404}, missing
    assert hubs.log.revisions(HF, REPO) == {"main", fake_commit(REPO)}
    assert hubs.log.revisions(MS, REPO) == {"master"}
