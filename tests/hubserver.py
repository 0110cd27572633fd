"""A loopback stand-in for the Hugging Face Hub, shared by the hub tests (downloads and uploads).

No network is used. ``FakeHub`` is a threading HTTP server on 127.0.0.1 (random port)
that answers the requests huggingface_hub 2.4 makes, as the real hub does.

Reads: the revision API (``/api/models/{repo}/revision/{rev}``: ``sha`` and ``siblings``),
the tree API (``snapshot_download``), and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``
with ``X-Repo-Commit``/``ETag``/``Content-Length``; weight files answer with a 302 to
a "CDN" origin (``localhost`` instead of ``127.0.0.1``) carrying ``Location``,
``X-Linked-Etag`` and ``X-Linked-Size``, so the client follows the same path as with
real LFS files. Errors carry the ``X-Error-Code`` headers the client maps to its
exception classes (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``, ``EntryNotFound``).

Writes (``create_repo``, ``create_branch``, ``create_commit``/``upload_folder``): the repo
creation API (a new repository gets an initial commit holding ``.gitattributes``),
README metadata validation, the ``preupload`` API (weight files are LFS, the rest
regular), the git LFS batch API with "basic" transfers (a ``PUT`` of each new blob,
its sha256 checked), the branch API, and the ndjson commit API (``create_pr`` opens
``refs/pr/N``). Writes need a bearer token of :attr:`FakeHub.users`. huggingface_hub's
Xet transfer is disabled by the fixture (its storage protocol is not served here), so
LFS files take the HTTP path. Every commit is recorded in :attr:`FakeHub.commit_log`.

It records every request, so tests assert what was (not) fetched or sent. The
endpoint is set through ``HF_ENDPOINT`` (and huggingface_hub's constants, which
read it at import), offline mode through ``HF_HUB_OFFLINE`` (likewise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants as hf_constants

#: Seconds after which the server shuts itself down whatever happens.
SERVER_LIFETIME_S = 120
LFS_SUFFIXES = (".safetensors", ".bin")


# --- the loopback hub ------------------------------------------------------------------------


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    token: str | None = None  # private: this bearer token is required
    gated: bool = False

    def files(self, ref: str = "main") -> dict[str, bytes]:
        """The files at branch (or PR ref, or commit) ``ref``."""
        return self.commits[self.refs.get(ref, ref)]


class FakeHub:
    """A minimal Hugging Face Hub on 127.0.0.1 that records the requests it serves."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path)
        self.auth: list[str | None] = []  # Authorization header of each request
        self.on_served: Callable[[str, str], None] | None = None  # called with (method, path) after each response
        self.down = False  # answer every request with 503, as a hub in trouble does
        self.users: dict[str, str] = {}  # bearer token -> user name: who may create repositories and commit
        self.commit_log: list[dict[str, Any]] = []  # every commit made through the commit API
        self.lfs_puts: list[str] = []  # sha256 of every blob uploaded through LFS
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}  # sha256 -> content ("CDN")
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a server thread for long

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

            def do_POST(self) -> None:
                hub._serve(self, head=False)

            def do_PUT(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(SERVER_LIFETIME_S, self.server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    # --- content ---------------------------------------------------------------------------

    def push(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main", **flags: Any) -> str:
        """Add a commit holding ``files`` and point ``ref`` at it; returns the commit sha."""
        repo = self.repos.setdefault(repo_id, FakeRepo(**flags))
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        for content in files.values():
            self._blobs[hashlib.sha256(content).hexdigest()] = content
        return sha

    def fetched(self, method: str = "GET") -> list[str]:
        """File paths (``{repo}/{commit}/{file}``) of the ``/resolve/`` requests made with ``method``."""
        out = []
        for m, path in self.requests:
            if m == method and "/resolve/" in path:
                repo, _, rest = path.lstrip("/").partition("/resolve/")
                out.append(f"{repo}/{rest}")
        return out

    # --- serving ---------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlsplit(h.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        path = "/" + "/".join(parts)
        body = _read_body(h) if h.command in ("POST", "PUT") else b""
        with self._lock:
            self.requests.append((h.command, path))
            self.auth.append(h.headers.get("Authorization"))
            if self.down:
                self._error(h, 503, "ServiceUnavailable", "the hub is down")
            elif h.command in ("POST", "PUT"):
                self._route_write(h, parts, body, parse_qs(url.query))
            else:
                self._route(h, parts, head=head)
            if self.on_served is not None:
                self.on_served(h.command, path)

    def _route(self, h: BaseHTTPRequestHandler, parts: list[str], *, head: bool) -> None:
        if parts[:1] == ["cdn"] and len(parts) == 2 and parts[1] in self._blobs:
            return self._send(h, 200, self._blobs[parts[1]], head=head)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            kind = parts[4] if len(parts) > 4 else "revision"  # /api/models/{repo} is revision "main"
            rev, rest = (parts[5] if len(parts) > 5 else "main"), parts[6:]
            found = self._check_commit(h, repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            if kind == "revision":
                siblings = [{"rfilename": name} for name in sorted(files)]
                body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.token is not None,
                        "gated": repo.gated, "siblings": siblings}  # fmt: skip
                return self._send(h, 200, json.dumps(body).encode(), content_type="application/json")
            if kind == "tree" and not rest:
                tree = [{"type": "file", "path": n, "size": len(c), "oid": _git_sha(c)} for n, c in files.items()]
                return self._send(h, 200, json.dumps(tree).encode(), content_type="application/json")
            return self._error(h, 404, "EntryNotFound", "not served by this fake hub")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found = self._check_commit(h, repo_id, rev)
            if found is None:
                return
            repo, sha = found
            content = repo.commits[sha].get(name)
            if content is None:
                return self._error(h, 404, "EntryNotFound", f"{name} does not exist at {sha}", commit=sha)
            if name.endswith(LFS_SUFFIXES):  # LFS: the hub redirects to its CDN, another origin
                sha256 = hashlib.sha256(content).hexdigest()
                headers = {"Location": f"http://localhost:{self.port}/cdn/{sha256}", "X-Repo-Commit": sha,
                           "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content)),
                           "ETag": f'W/"{_git_sha(content)}"'}  # fmt: skip
                return self._send(h, 302, b"", head=True, headers=headers)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_sha(content)}"'}
            return self._send(h, 200, content, head=head, headers=headers)
        return self._error(h, 404, "RepoNotFound", "unknown route")

    # --- writes ----------------------------------------------------------------------------

    def _route_write(
        self, h: BaseHTTPRequestHandler, parts: list[str], body: bytes, query: dict[str, list[str]]
    ) -> None:
        if parts == ["api", "validate-yaml"]:
            return self._json(h, {"errors": [], "warnings": []})
        if len(parts) == 2 and parts[0] == "lfs-upload" and h.command == "PUT":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(h, 400, "BadRequest", "content does not match its sha256")
            self._blobs[parts[1]] = body
            self.lfs_puts.append(parts[1])
            return self._send(h, 200, b"")
        user = self._writer(h)
        if user is None:
            return None
        if parts == ["api", "repos", "create"]:
            return self._create_repo(h, user, json.loads(body))
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
            if self._check_repo(h, repo_id) is None:
                return None
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self._blobs:  # already stored: no upload action, as the hub answers
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._json(h, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit", "branch"):
            repo_id = "/".join(parts[2:4])
            repo = self._check_repo(h, repo_id)
            if repo is None:
                return None
            if parts[4] == "preupload":
                files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                          "shouldIgnore": False} for f in json.loads(body)["files"]]  # fmt: skip
                return self._json(h, {"files": files})
            if parts[4] == "branch":
                if parts[5] in repo.refs:
                    return self._error(h, 409, "Conflict", f"branch {parts[5]} already exists")
                repo.refs[parts[5]] = repo.refs["main"]
                return self._json(h, {})
            return self._commit(h, repo_id, repo, parts[5], body, create_pr=query.get("create_pr") == ["1"])
        return self._error(h, 404, "RepoNotFound", "unknown route")

    def _writer(self, h: BaseHTTPRequestHandler) -> str | None:
        """The user whose token authorises this write; sends 401 and returns None when there is none."""
        auth = h.headers.get("Authorization") or ""
        user = self.users.get(auth.removeprefix("Bearer "))
        if user is None:
            self._error(h, 401, "", "Invalid credentials in Authorization header" if auth else "Unauthorized")
        return user

    def _create_repo(self, h: BaseHTTPRequestHandler, user: str, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return self._error(h, 409, "Conflict", "You already created this model repo", url=url)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        token = next(t for t, u in self.users.items() if u == user) if private else None
        self.push(repo_id, {".gitattributes": GITATTRIBUTES}, token=token)
        return self._json(h, {"url": url, "name": repo_id})

    def _commit(
        self, h: BaseHTTPRequestHandler, repo_id: str, repo: FakeRepo, rev: str, body: bytes, *, create_pr: bool
    ) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        parent = self._check_revision(h, repo, rev)
        if parent is None:
            return None
        files = dict(repo.commits[parent])
        changed = []
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self._blobs:
                    return self._error(h, 422, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self._blobs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(h, 400, "BadRequest", f"commit operation {key} is not served by this fake hub")
            changed.append(value["path"])
        ref = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}" if create_pr else rev
        sha = self.push(repo_id, files, ref=ref)
        self.commit_log.append({"repo": repo_id, "sha": sha, "ref": ref, "message": header["summary"],
                                "description": header.get("description", ""), "files": changed})  # fmt: skip
        answer = {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}"
        return self._json(h, answer)

    def _json(self, h: BaseHTTPRequestHandler, body: Any, content_type: str = "application/json") -> None:
        self._send(h, 200, json.dumps(body).encode(), content_type=content_type)

    # --- checks -----------------------------------------------------------------------------

    def _check_repo(self, h: BaseHTTPRequestHandler, repo_id: str) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            self._error(h, 403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                        "authorized list. Visit the model page to ask for access.")  # fmt: skip
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(h, 401, "RepoNotFound", "Invalid username or password.")
            return None
        return repo

    def _check_revision(self, h: BaseHTTPRequestHandler, repo: FakeRepo, rev: str) -> str | None:
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _check_commit(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str) -> tuple[FakeRepo, str] | None:
        """The repository and the commit ``rev`` names, both checked (an error is sent and None returned otherwise)."""
        repo = self._check_repo(h, repo_id)
        if repo is None:
            return None
        sha = self._check_revision(h, repo, rev)
        return None if sha is None else (repo, sha)

    def _error(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        code: str,
        message: str,
        commit: str | None = None,
        url: str | None = None,
    ) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        payload = {"error": message, **({"url": url} if url else {})}
        self._send(h, status, json.dumps(payload).encode(), headers=headers,
                   head=h.command == "HEAD", content_type="application/json")  # fmt: skip

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        *,
        head: bool = False,
        headers: dict[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body, sent with a Content-Length or chunked."""
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                h.rfile.readline()
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _git_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running FakeHub that huggingface_hub (and so lmport and transformers) talks to; no token anywhere."""
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # uploads take the LFS path this server serves
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))  # transformers' PEFT probe
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # for the CLI subprocess
        yield server


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, as set before the process started (huggingface_hub reads it at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

