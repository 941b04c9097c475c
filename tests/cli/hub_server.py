"""A Hub look-alike on 127.0.0.1 speaking the few endpoints huggingface_hub uses to create a repo, commit files
inline ("regular" upload mode) and download them: enough for push -> snapshot_download round trips offline."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content (newest commit only)
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        self.refuse_commits = False  # answer commits 403, as the Hub does for a token without write access
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, payload, status: int = 200) -> None:
                self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                hub.requests.append(f"POST {self.path}")
                if self.path == "/api/repos/create":
                    request = json.loads(self._body())
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                    hub.repos.setdefault(repo, {})
                    return self._json({"url": f"{hub.endpoint}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":  # create_commit checks the README's metadata block
                    front = json.loads(self._body())["content"].split("---")[1]
                    if not isinstance(yaml.safe_load(front), dict):
                        return self._json({"error": "README metadata is not a YAML mapping"}, 400)
                    return self._json({"warnings": []})
                if m := re.fullmatch(rf"/api/models/{REPO}/preupload/main", self.path):
                    files = json.loads(self._body())["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json({"files": modes})
                if m := re.fullmatch(rf"/api/models/{REPO}/commit/main", self.path):
                    if hub.refuse_commits:
                        return self._json({"error": "You don't have the rights to create a commit here"}, 403)
                    repo = hub.repos[m["repo"]]
                    for line in self._body().decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            repo[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] != "header":
                            return self._json({"error": f"unsupported commit item {item['key']}"}, 400)
                    sha = hashlib.sha1(json.dumps(sorted((p, c.hex()) for p, c in repo.items())).encode()).hexdigest()
                    hub.commits[m["repo"]] = sha
                    return self._json({"commitUrl": f"{hub.endpoint}/{m['repo']}/commit/{sha}", "commitOid": sha})
                self._json({"error": f"unknown endpoint {self.path}"}, 404)

            def _get(self, head: bool) -> None:
                hub.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
                path = self.path.split("?")[0]
                if m := re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
                    if m["repo"] not in hub.commits:
                        return self._json({"error": "Repository not found"}, 404)
                    files = hub.repos[m["repo"]]
                    return self._json({
                        "id": m["repo"], "modelId": m["repo"], "sha": hub.commits[m["repo"]], "private": False,
                        "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
                    })
                if m := re.fullmatch(rf"/api/models/{REPO}/tree/[^/]+", path):  # snapshot_download's file list
                    files = hub.repos.get(m["repo"], {})
                    return self._json([
                        {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                        for p, c in sorted(files.items())
                    ])
                if m := re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", path):
                    content = hub.repos.get(m["repo"], {}).get(m["file"])
                    if content is None:
                        return self._send(404, headers={"X-Error-Code": "EntryNotFound"}, head=head)
                    etag = f'"{hashlib.sha1(content).hexdigest()}"'
                    headers = {"ETag": etag, "X-Repo-Commit": hub.commits[m["repo"]]}
                    return self._send(200, content, headers, head=head)
                self._json({"error": f"unknown endpoint {self.path}"}, 404)

            def do_GET(self) -> None:
                self._get(head=False)

            def do_HEAD(self) -> None:
                self._get(head=True)

        return Handler


def closed_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: connecting is refused at once, as with the Hub unreachable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
