"""Fixtures for the publishing tests: a real annotated `OUT/` and a recording fake of the Hub HTTP API.

`OUT/` is produced once per session by the real `annotate` command (rule-based teacher, a tiny
Bridge-layout RLDS source written by the project's writer), so the card, validation, push and
export are tested against exactly the layout the engine writes. Tests that modify it get a copy.

The Hub fake is a real HTTP server on 127.0.0.1 (stdlib `ThreadingHTTPServer`): `huggingface_hub`
talks to it through its normal code path (`HfApi(endpoint=...)`), and every request is recorded
(method, path, headers, body) so tests can assert what was created, uploaded, tagged and merged.
It implements the endpoints the client calls for a dataset push: repo create, branch create,
file metadata/download (`/datasets/{repo}/resolve/{rev}/{path}`), `validate-yaml`, `preupload`
(parquet and other binary files answered as LFS, like the Hub's default `.gitattributes`), the LFS
batch API with basic PUT upload, the NDJSON commit, and tags.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds


def tiny_episode(seed: int, steps: int) -> dict[str, Any]:
    """A Bridge-layout example: reach forward, close the gripper, lift, open it."""
    state = np.zeros((steps, 7), np.float32)
    state[:, 0] = np.linspace(0.2, 0.35, steps)
    state[:, 2] = np.where(np.arange(steps) < steps // 2, 0.05, np.linspace(0.05, 0.2, steps))
    state[:, 6] = np.where((np.arange(steps) >= steps // 3) & (np.arange(steps) < steps - 2), 0.0, 1.0)
    action = np.zeros((steps, 7), np.float32)
    action[:-1, :6] = state[1:, :6] - state[:-1, :6]
    action[:, 6] = state[:, 6]
    frames = np.zeros((steps, 32, 32, 3), np.uint8)
    for t in range(steps):
        frames[t, 4:12, (t * 2 + seed) % 20 : (t * 2 + seed) % 20 + 8] = (250, 200, 30)
    return {
        "steps": [
            {
                "observation": {"image_0": frames[t], "state": state[t]},
                "action": action[t],
                "discount": 1.0,
                "reward": float(t == steps - 1),
                "is_first": t == 0,
                "is_last": t == steps - 1,
                "is_terminal": t == steps - 1,
                "language_instruction": f"put the spoon {seed} on the towel",
                "language_embedding": np.zeros(512, np.float32),
            }
            for t in range(steps)
        ],
        "episode_metadata": {
            "file_path": f"/data/raw/traj{seed}.pkl",
            "episode_id": seed,
            **{f"has_image_{c}": c == 0 for c in range(4)},
            "has_language": True,
        },
    }


EPISODES = 3
STEPS = (10, 11, 12)


@pytest.fixture(scope="session")
def source_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny `bridge_orig` RLDS source: 3 episodes of 10, 11, 12 steps (1 camera, 32x32)."""
    root = tmp_path_factory.mktemp("src")
    eps = [tiny_episode(i, STEPS[i]) for i in range(EPISODES)]
    d = write_rlds(root, specs.bridge_features(cameras=1, image_size=(32, 32)), eps, name="bridge_orig")
    return f"rlds:{d}"


@pytest.fixture(scope="session")
def annotated_out(tmp_path_factory: pytest.TempPathFactory, source_uri: str) -> Path:
    """`OUT/` as written by `refine-data annotate SOURCE --teacher rule-based` (read-only: copy to modify)."""
    from refinevla.annotate.annotate_cmd import AnnotateArgs, run_annotate

    out = tmp_path_factory.mktemp("annotated") / "out"
    code = run_annotate(AnnotateArgs(source=source_uri, out=out, progress="none"))
    assert code == 0
    return out


@pytest.fixture
def out_copy(annotated_out: Path, tmp_path: Path) -> Path:
    """A private copy of the annotated `OUT/` for tests that change it."""
    dest = tmp_path / "out"
    shutil.copytree(annotated_out, dest)
    return dest


# --------------------------------------------------------------------------- Hub fake


@dataclass
class HubRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclass
class FakeHub:
    """State of the fake Hub: repos with files per revision, tags, branches, LFS objects, the request log."""

    url: str = ""
    requests: list[HubRequest] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id -> {"private", "branches": {rev: files}}
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # repo_id -> {tag: commit}
    lfs: dict[str, bytes] = field(default_factory=dict)  # oid -> content
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"repo", "revision", "oid", "ops"}
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> None:
        """Pre-create a dataset repo (e.g. one whose README was written by `datasets.push_to_hub`)."""
        self.repos[repo_id] = {"private": False, "branches": {"main": dict(files or {})}}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][revision]

    def calls(self, method: str, contains: str) -> list[HubRequest]:
        return [r for r in self.requests if r.method == method and contains in r.path]


def _hub_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if payload is None else payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        def _record(self) -> HubRequest:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlparse(self.path)
            req = HubRequest(
                self.command, unquote(url.path), url.query, {k.lower(): v for k, v in self.headers.items()}, body
            )
            with hub.lock:
                hub.requests.append(req)
            return req

        def _not_found(self, what: str) -> None:
            self._send(404, {"error": f"{what} not found"}, {"X-Error-Code": "RepoNotFound"})

        def do_HEAD(self) -> None:
            self._serve_file(self._record())

        def do_GET(self) -> None:
            req = self._record()
            if req.path.startswith("/datasets/"):
                self._serve_file(req)
            else:
                self._send(404, {"error": "unknown endpoint"})

        def _serve_file(self, req: HubRequest) -> None:
            # /datasets/{org}/{name}/resolve/{rev}/{path}
            parts = req.path.split("/")
            if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
                self._send(404, {"error": "unknown endpoint"})
                return
            repo_id, rev, path = f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._not_found("repository")
                return
            files = repo["branches"].get(rev)
            if files is None or path not in files:
                self._send(404, {"error": "entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return
            content = files[path]
            etag = hashlib.sha1(content).hexdigest()
            self._send(200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": "0" * 40})

        def do_PUT(self) -> None:
            req = self._record()
            if req.path.startswith("/lfs-upload/"):
                oid = req.path.rsplit("/", 1)[-1]
                if hashlib.sha256(req.body).hexdigest() != oid:
                    self._send(400, {"error": "sha256 mismatch"})
                    return
                hub.lfs[oid] = req.body
                self._send(200, {})
            else:
                self._send(404, {"error": "unknown endpoint"})

        def do_POST(self) -> None:
            req = self._record()
            p = req.path
            if p == "/api/repos/create":
                body = req.json()
                repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
                if repo_id in hub.repos:
                    # The Hub answers 409 with the repo's url, which the client reads when exist_ok=True.
                    url = f"{hub.url}/datasets/{repo_id}"
                    self._send(409, {"error": "You already created this dataset repo", "url": url})
                    return
                hub.repos[repo_id] = {"private": body.get("visibility") == "private", "branches": {"main": {}}}
                self._send(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})
            elif p == "/api/validate-yaml":
                self._send(200, {"errors": [], "warnings": []})
            elif p.startswith("/api/datasets/"):
                self._dataset_api(req)
            elif p.endswith(".git/info/lfs/objects/batch"):
                body = req.json()
                objects = [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}", "header": {}}},
                    }
                    for o in body["objects"]
                ]
                self._send(200, {"transfer": "basic", "objects": objects})
            else:
                self._send(404, {"error": "unknown endpoint"})

        def _dataset_api(self, req: HubRequest) -> None:
            # /api/datasets/{org}/{name}/{action}/{rev}
            parts = req.path.split("/")
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._not_found("repository")
                return
            if action == "branch":
                repo["branches"].setdefault(rev, dict(repo["branches"]["main"]))
                self._send(200, {})
            elif action == "preupload":
                files = []
                for f in req.json()["files"]:
                    sample = base64.b64decode(f["sample"])
                    binary = f["path"].endswith((".parquet", ".arrow", ".mp4")) or b"\x00" in sample
                    files.append(
                        {"path": f["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False}
                    )
                self._send(200, {"files": files})
            elif action == "commit":
                if rev not in repo["branches"]:
                    self._send(404, {"error": f"revision {rev} not found"}, {"X-Error-Code": "RevisionNotFound"})
                    return
                ops = req.ndjson()
                target = repo["branches"][rev]
                for op in ops[1:]:
                    value = op["value"]
                    if op["key"] == "file":
                        target[value["path"]] = base64.b64decode(value["content"])
                    elif op["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                            return
                        target[value["path"]] = hub.lfs[value["oid"]]
                oid = hashlib.sha1(req.body).hexdigest()
                hub.commits.append({"repo": repo_id, "revision": rev, "oid": oid, "ops": ops})
                self._send(200, {"commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{oid}", "commitOid": oid})
            elif action == "tag":
                tag = req.json()["tag"]
                repo_tags = hub.tags.setdefault(repo_id, {})
                if tag in repo_tags:
                    self._send(409, {"error": "tag exists"})
                    return
                repo_tags[tag] = rev
                self._send(200, {})
            else:
                self._send(404, {"error": "unknown endpoint"})

        def do_DELETE(self) -> None:
            req = self._record()
            parts = req.path.split("/")
            if len(parts) >= 7 and parts[5] == "tag":
                hub.tags.get(f"{parts[3]}/{parts[4]}", {}).pop(parts[6], None)
                self._send(200, {})
            else:
                self._send(404, {"error": "unknown endpoint"})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running fake Hub; `HF_ENDPOINT` points at it and Xet is off so uploads take the LFS path."""
    import huggingface_hub.constants as hf_constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # hf_xet is installed, and the client would upload through Xet storage (a Rust CAS client we cannot
    # fake); the Hub still accepts the LFS protocol, which the client uses when Xet is disabled.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
