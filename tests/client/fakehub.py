"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, for huggingface_hub to talk to.

It serves only what the client calls: model info (with LFS sha256 per file when
``blobs=true``), and file downloads under ``/{repo}/resolve/{revision}/{path}``,
with the headers huggingface_hub reads (commit, etag, size). Every request is
recorded, so tests can prove what was, and was not, downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth", ".gguf")


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha1(json.dumps(sorted(
            (n, hashlib.sha256(b).hexdigest()) for n, b in self.files.items()
        )).encode())
        self.sha = digest.hexdigest()

    @staticmethod
    def is_lfs(name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def sibling(self, name: str, blobs: bool) -> dict[str, object]:
        data = self.files[name]
        out: dict[str, object] = {"rfilename": name}
        if blobs:
            out["size"] = len(data)
            out["blobId"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if self.is_lfs(name):
                out["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                              "pointerSize": 134}
        return out

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def add(self, repo_id: str, files: dict[str, bytes]) -> Repo:
        repo = Repo(files)
        self.repos[repo_id] = repo
        return repo

    def downloads(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def find(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None or revision not in ("main", repo.sha):
            return None
        return repo


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                  *, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code,
                        "X-Error-Message": message}, head=head)

        def _route(self, head: bool) -> None:
            parts = urlsplit(self.path)
            hub.requests.append((self.command, parts.path))
            path = unquote(parts.path)
            query = parse_qs(parts.query)
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/"):]
                repo_id, _, revision = rest.partition("/revision/")
                repo = hub.find(repo_id, revision or "main")
                if repo is None:
                    code = "RepoNotFound" if repo_id not in hub.repos else "RevisionNotFound"
                    return self._error(404, code, f"{repo_id}@{revision}: not found", head)
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                info = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                        "siblings": [repo.sibling(n, blobs) for n in sorted(repo.files)]}
                return self._send(200, json.dumps(info).encode(),
                                  {"Content-Type": "application/json"}, head=head)
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                revision, _, name = rest.partition("/")
                repo = hub.find(repo_id, revision)
                if repo is None:
                    code = "RepoNotFound" if repo_id not in hub.repos else "RevisionNotFound"
                    return self._error(404, code, f"{repo_id}@{revision}: not found", head)
                if name not in repo.files:
                    return self._error(404, "EntryNotFound", f"{name}: no such file", head)
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(name)}"',
                           "Content-Type": "application/octet-stream"}
                if repo.is_lfs(name):
                    headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
                    headers["X-Linked-Size"] = str(len(repo.files[name]))
                return self._send(200, repo.files[name], headers, head=head)
            return self._error(404, "NotFound", f"{path}: no such route", head)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


class RunningHub:
    """A FakeHub served on a free loopback port until :meth:`close`."""

    def __init__(self) -> None:
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.server.daemon_threads = True
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
