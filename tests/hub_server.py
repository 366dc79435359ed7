"""A minimal Hugging Face Hub on 127.0.0.1 for tests: the endpoints ``huggingface_hub`` uses to
create a repository, validate a card, pre-upload (always answering "regular"), commit, and download.

It keeps files in memory per repository and records every request, so tests can assert on what the
real client sent. Only loopback is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict[str, Any]] = []
        self.heads: dict[str, str] = {}  # repository -> its latest commit
        self.card_data: dict[str, dict[str, Any]] = {}  # repository -> the YAML of its model card
        self.requests: list[tuple[str, str]] = []
        self.tokens: list[str | None] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _record(self) -> str:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                hub.tokens.append(self.headers.get("Authorization"))
                return path

            def do_POST(self) -> None:
                path = self._record()
                body = self._body()
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}"
                    hub.repos.setdefault(repo, {})
                    return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                # /api/models/{ns}/{name}/preupload/{rev} and /api/models/{ns}/{name}/commit/{rev}
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    repo, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo not in hub.repos:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        return self._commit(repo, body)
                self._json(404, {"error": f"unknown endpoint {path}"})

            def _commit(self, repo: str, body: bytes) -> None:
                files: dict[str, bytes] = {}
                header: dict[str, Any] = {}
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        header = item["value"]
                    elif item["key"] == "file":
                        value = item["value"]
                        files[value["path"]] = base64.b64decode(value["content"])
                hub.repos[repo].update(files)
                oid = hashlib.sha1(body).hexdigest()
                hub.heads[repo] = oid
                hub.commits.append({"repo": repo, "files": sorted(files), "header": header})
                self._json(
                    200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )

            def do_HEAD(self) -> None:
                self._resolve()

            def do_GET(self) -> None:
                self._resolve()

            def _resolve(self) -> None:
                path = self._record()
                parts = path.split("/")
                # /api/models/{ns}/{name}[/revision/{rev}]: model_info, with the repository's head commit
                if parts[1:3] == ["api", "models"] and (
                    len(parts) == 5 or (len(parts) >= 7 and parts[5] == "revision")
                ):
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    info = {"id": repo, "sha": hub.heads.get(repo, "0" * 40)}
                    if repo in hub.card_data:
                        info["cardData"] = hub.card_data[repo]
                    return self._json(200, info)
                # /{ns}/{name}/resolve/{rev}/{file...}
                if len(parts) >= 6 and parts[3] == "resolve":
                    repo, filename = f"{parts[1]}/{parts[2]}", "/".join(parts[5:])
                    if repo not in hub.repos:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    content = hub.repos[repo].get(filename)
                    if content is None:
                        return self._json(
                            404,
                            {"error": "Entry not found"},
                            {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": "0" * 40},
                        )
                    etag = hashlib.sha1(content).hexdigest()
                    return self._send(200, content, {"X-Repo-Commit": "1" * 40, "ETag": f'"{etag}"'})
                self._json(404, {"error": f"unknown endpoint {path}"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
