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
batch API with basic PUT upload, the NDJSON commit, and tags; and those `snapshot_download` calls
for a download: repo info (`/api/datasets/{repo}/revision/{rev}`, siblings and commit sha), the
recursive tree listing (`/api/datasets/{repo}/tree/{rev}`), and `resolve` by branch, tag or commit.
As on the Hub, every commit is a snapshot with its own sha, a regular file's ETag is its git blob
id, and an LFS file's `resolve` answers 302 to a CDN on another origin (a second local server, so
the client must drop the token) with `X-Linked-Etag` (sha256) and `X-Linked-Size`.
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
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds
from tests.conftest import tiny_episode

EPISODES = 3
STEPS = (10, 11, 12)


@pytest.fixture(scope="session")
def source_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny `bridge_orig` RLDS source: 3 episodes of 10, 11, 12 steps (1 camera, 32x32)."""
    root = tmp_path_factory.mktemp("src")
    eps = [tiny_episode(i, STEPS[i], size=32) for i in range(EPISODES)]
    d = write_rlds(root, specs.bridge_features(cameras=1, image_size=(32, 32)), eps, name="bridge_orig")
    return f"rlds:{d}"


@pytest.fixture(scope="session")
def annotated_out(tmp_path_factory: pytest.TempPathFactory, source_uri: str) -> Path:
    """`OUT/` as written by `refine-data annotate SOURCE --teacher rule-based` (read-only: copy to modify)."""
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

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


def lfs_tracked(path: str, sample: bytes) -> bool:
    """Whether the Hub stores a file in LFS: binary extensions of its default `.gitattributes`, or binary bytes."""
    return path.endswith((".parquet", ".arrow", ".mp4")) or b"\x00" in sample[:512]


def git_blob_id(content: bytes) -> str:
    """The git blob id (sha1 of `blob <size>\\0<content>`): a regular file's ETag and tree `oid` on the Hub."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file."""
    sha = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n".encode()


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
    """State of the fake Hub: repos with files per branch and per commit, tags, LFS objects, the request log.

    `repos[repo_id]` is `{"private", "branches": {branch: files}, "heads": {branch: commit},
    "snapshots": {commit: files}}`; `branches` holds the live files of each branch, `snapshots` the
    files as of each commit (what `resolve/{commit}` serves). Requests to the CDN are logged too
    (paths under `/lfs-objects/`).
    """

    url: str = ""
    cdn_url: str = ""  # where LFS downloads are redirected: another origin, like the Hub's CDN
    requests: list[HubRequest] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # repo_id -> {tag: commit}
    lfs: dict[str, bytes] = field(default_factory=dict)  # oid -> content
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"repo", "revision", "oid", "ops"}
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None) -> None:
        """Pre-create a dataset repo (e.g. one whose README was written by `datasets.push_to_hub`)."""
        self.repos[repo_id] = {"private": False, "branches": {"main": {}}, "heads": {}, "snapshots": {}}
        self.commit_files(repo_id, files or {}, message="initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][revision]

    def calls(self, method: str, contains: str) -> list[HubRequest]:
        return [r for r in self.requests if r.method == method and contains in r.path]

    def commit_files(
        self, repo_id: str, files: dict[str, bytes], revision: str = "main", message: str = "edit on the Hub"
    ) -> str:
        """A commit made outside refinevla (an edit in the web UI, another client): new snapshot, branch moved."""
        repo = self.repos[repo_id]
        repo["branches"][revision].update(files)
        for path, content in files.items():
            if lfs_tracked(path, content):
                self.lfs[hashlib.sha256(content).hexdigest()] = content
        parent = repo["heads"].get(revision, "")
        oid = hashlib.sha1(f"{repo_id}\n{revision}\n{parent}\n{message}\n{sorted(files)}".encode()).hexdigest()
        self.record_commit(repo_id, revision, oid)
        return oid

    def record_commit(self, repo_id: str, revision: str, oid: str) -> None:
        """Snapshot the branch's files as commit `oid` and move the branch head to it."""
        repo = self.repos[repo_id]
        repo["snapshots"][oid] = dict(repo["branches"][revision])
        repo["heads"][revision] = oid

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) for a branch, a tag or a commit of the repo; None if the revision does not exist."""
        repo = self.repos[repo_id]
        commit = repo["heads"].get(revision) or self.tags.get(repo_id, {}).get(revision) or revision
        files = repo["snapshots"].get(commit)
        return None if files is None else (commit, files)


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

        def _revision_not_found(self, rev: str) -> None:
            self._send(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})

        def do_HEAD(self) -> None:
            self._serve_file(self._record())

        def do_GET(self) -> None:
            req = self._record()
            if req.path.startswith("/datasets/"):
                self._serve_file(req)
            elif req.path.startswith("/api/datasets/"):
                self._dataset_get(req)
            else:
                self._send(404, {"error": "unknown endpoint"})

        def _serve_file(self, req: HubRequest) -> None:
            # /datasets/{org}/{name}/resolve/{rev}/{path}
            parts = req.path.split("/")
            if len(parts) < 7 or parts[1] != "datasets" or parts[4] != "resolve":
                self._send(404, {"error": "unknown endpoint"})
                return
            repo_id, rev, path = f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:])
            resolved = self._resolve(repo_id, rev)
            if resolved is None:
                return
            commit, files = resolved
            if path not in files:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
                self._send(404, {"error": "entry not found"}, headers)
                return
            content = files[path]
            if lfs_tracked(path, content):
                # The Hub redirects LFS files to its CDN; the file's metadata rides on the redirect.
                sha256 = hashlib.sha256(content).hexdigest()
                headers = {
                    "Location": f"{hub.cdn_url}/lfs-objects/{sha256}",
                    "ETag": f'"{git_blob_id(lfs_pointer(content))}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(content)),
                    "X-Repo-Commit": commit,
                }
                self._send(302, None, headers)
                return
            self._send(200, content, {"ETag": f'"{git_blob_id(content)}"', "X-Repo-Commit": commit})

        def _resolve(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
            """(commit, files) of a repo at a revision, or None after sending the Hub's 404."""
            if repo_id not in hub.repos:
                self._not_found("repository")
                return None
            resolved = hub.resolve(repo_id, rev)
            if resolved is None:
                self._revision_not_found(rev)
            return resolved

        def _dataset_get(self, req: HubRequest) -> None:
            # /api/datasets/{org}/{name}/revision/{rev} | /api/datasets/{org}/{name}/tree/{rev}[/{path}]
            parts = req.path.split("/")
            if len(parts) < 7 or parts[5] not in ("revision", "tree"):
                self._send(404, {"error": "unknown endpoint"})
                return
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            resolved = self._resolve(repo_id, rev)
            if resolved is None:
                return
            commit, files = resolved
            if action == "revision":
                self._send(
                    200,
                    {
                        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                        "id": repo_id,
                        "author": repo_id.split("/")[0],
                        "sha": commit,
                        "private": hub.repos[repo_id]["private"],
                        "gated": False,
                        "disabled": False,
                        "lastModified": "2025-01-01T00:00:00.000Z",
                        "tags": [],
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )
                return
            prefix = "/".join(parts[7:])
            recursive = parse_qs(req.query).get("recursive", ["false"])[0].lower() == "true"
            self._send(200, self._tree(files, prefix, recursive))

        @staticmethod
        def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
            """The Hub's tree listing: files (with `lfs` for LFS ones) and directories under `prefix`."""
            base = f"{prefix}/" if prefix else ""
            entries: dict[str, dict[str, Any]] = {}
            for path, content in sorted(files.items()):
                if not path.startswith(base):
                    continue
                rel = path[len(base) :].split("/")
                depth = len(rel) if recursive else 1
                for i in range(1, min(depth, len(rel) - 1) + 1):  # the directories on the way
                    d = base + "/".join(rel[:i])
                    entries.setdefault(
                        d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    )
                if not recursive and len(rel) > 1:
                    continue
                entry: dict[str, Any] = {"type": "file", "size": len(content), "path": path}
                if lfs_tracked(path, content):
                    pointer = lfs_pointer(content)
                    entry["oid"] = git_blob_id(pointer)
                    entry["lfs"] = {
                        "oid": hashlib.sha256(content).hexdigest(),
                        "size": len(content),
                        "pointerSize": len(pointer),
                    }
                else:
                    entry["oid"] = git_blob_id(content)
                entries[path] = entry
            return list(entries.values())

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
                hub.add_repo(repo_id)
                hub.repos[repo_id]["private"] = body.get("visibility") == "private"
                self._send(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id})
            elif p == "/api/validate-yaml":
                self._send(200, {"errors": [], "warnings": []})
            elif p.startswith(("/api/datasets/", "/api/models/")):  # model repos: refine-train's policies
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
                if rev not in repo["branches"]:
                    repo["branches"][rev] = dict(repo["branches"]["main"])
                    repo["heads"][rev] = repo["heads"]["main"]
                self._send(200, {})
            elif action == "preupload":
                files = []
                for f in req.json()["files"]:
                    binary = lfs_tracked(f["path"], base64.b64decode(f["sample"]))
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
                hub.record_commit(repo_id, rev, oid)
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


def _cdn_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """The CDN the Hub redirects LFS downloads to: serves LFS objects by sha256, logs requests in `hub`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            req = HubRequest("GET", url.path, url.query, {k.lower(): v for k, v in self.headers.items()}, b"")
            with hub.lock:
                hub.requests.append(req)
            content = hub.lfs.get(url.path.rsplit("/", 1)[-1]) if url.path.startswith("/lfs-objects/") else None
            self.send_response(200 if content is not None else 404)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content or b"")))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(content or b"")

    return Handler


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    # A short poll interval: `shutdown()` waits up to one interval, at every test teardown.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running fake Hub (and its CDN); `HF_ENDPOINT` points at it and Xet is off so transfers take the LFS path."""
    import huggingface_hub.constants as hf_constants

    hub = FakeHub()
    server, hub.url = _serve(_hub_handler(hub))
    cdn, hub.cdn_url = _serve(_cdn_handler(hub))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # hf_xet is installed, and the client would transfer through Xet storage (a Rust CAS client we cannot
    # fake); the Hub still speaks the LFS protocol, which the client uses when Xet is disabled.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # The cache path is read at import: downloads (refs, blobs) must not land in the user's cache.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    try:
        yield hub
    finally:
        for s in (server, cdn):
            s.shutdown()
            s.server_close()
