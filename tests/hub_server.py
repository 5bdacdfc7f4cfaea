"""A Hugging Face hub on 127.0.0.1: the few routes huggingface_hub's downloads use, serving local directories.

Point HF_ENDPOINT at it and huggingface_hub's own `snapshot_download` / `hf_hub_download` fill a real hub cache;
with HF_HUB_OFFLINE=1 afterwards, names resolve from that cache alone. Routes: repository info
(`/api/models/<repo>/revision/<rev>`), the recursive file tree (`/api/models/<repo>/tree/<rev>`) and file
downloads (`/<repo>/resolve/<rev>/<path>`, HEAD and GET). Each repository has one commit, reachable as `main` or by
its hash. Every request is counted, so a test can tell a cache hit from a download.
"""

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def commit_of(directory: Path) -> str:
    """A 40-hex commit hash standing for the directory's content."""
    digest = hashlib.sha1()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + hashlib.sha1(path.read_bytes()).digest())
    return digest.hexdigest()


class HubServer:
    """`with HubServer({"org/name": directory}) as hub:` serves the directories at `hub.endpoint`."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: (Path(directory), commit_of(Path(directory))) for repo, directory in repos.items()}
        self.requests: Counter = Counter()  # (method, route kind) -> count
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _files(self, repo: str) -> list[str]:
        directory = self.repos[repo][0]
        return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: pytest shows failures, not access logs
                pass

            def do_HEAD(self):
                self._route(body=False)

            def do_GET(self):
                self._route(body=True)

            def _route(self, body: bool):
                path = unquote(urlsplit(self.path).path)
                for kind, pattern in (("info", _INFO), ("tree", _TREE), ("resolve", _RESOLVE)):
                    match = pattern.match(path)
                    if match:
                        hub.requests[(self.command, kind)] += 1
                        return self._serve(kind, match, body)
                self._error(404, "EntryNotFound")

            def _serve(self, kind: str, match, body: bool):
                repo, revision = match["repo"], match["rev"]
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                directory, commit = hub.repos[repo]
                if revision not in ("main", commit):
                    return self._error(404, "RevisionNotFound")
                if kind == "info":
                    siblings = [{"rfilename": name} for name in hub._files(repo)]
                    return self._json({"id": repo, "modelId": repo, "sha": commit, "siblings": siblings}, commit)
                if kind == "tree":
                    entries = [
                        {"type": "file", "path": name, "size": (directory / name).stat().st_size, "oid": commit}
                        for name in hub._files(repo)
                    ]
                    return self._json(entries, commit)
                target = directory / match["path"]
                if not target.is_file():
                    return self._error(404, "EntryNotFound", commit)
                data = target.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, payload, commit: str):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, commit: str | None = None):
                data = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
