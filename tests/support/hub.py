"""A stand-in for the Hugging Face Hub on loopback: just the file-resolve protocol huggingface_hub uses.

``HEAD/GET /{org}/{name}/resolve/{revision}/{filename}`` answer with the headers hf_hub_download
reads (X-Repo-Commit, ETag, Content-Length) or a 404 carrying X-Error-Code, as the real Hub does.
A repo listed in ``private`` answers 401 unless the request carries its token. ``commits`` says which commit a
(repo, revision) stands for (X-Repo-Commit; a branch can be moved by changing it); others answer forty zeros.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.private: dict[str, str] = {}
        self.downloads: list[str] = []
        self.authorizations: list[str | None] = []  # every request's Authorization header, to show what reached the hub
        self.delay_s = 0.0  # a slow or unreachable hub: each request waits this long before answering
        self.repo_delay_s: dict[str, float] = {}  # one slow repo among quick ones
        self.commits: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> the commit it stands for now
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _resolve(self, send_body: bool) -> None:
                standin.authorizations.append(self.headers.get("authorization"))
                if standin.delay_s:
                    time.sleep(standin.delay_s)
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                if standin.repo_delay_s.get(repo):
                    time.sleep(standin.repo_delay_s[repo])
                if repo not in standin.repos:
                    return self._error(404, "RepoNotFound")
                token = standin.private.get(repo)
                if token and self.headers.get("authorization") != f"Bearer {token}":
                    return self._error(401, "RepoNotFound")
                path = standin.repos[repo] / filename
                if not path.is_file():
                    return self._error(404, "EntryNotFound")
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", standin.commits.get((repo, revision), "0" * 40))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    standin.downloads.append(f"{repo}/{filename}")
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                self._resolve(send_body=False)

            def do_GET(self) -> None:
                self._resolve(send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False  # a delayed answer never holds up the test's end
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_config(self, repo: str, folder: Path, config: dict) -> None:
        """A repo holding just ``adapter_config.json`` (enough for the operator's validation), written under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        self.repos[repo] = folder

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
