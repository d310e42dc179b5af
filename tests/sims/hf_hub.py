"""A stand-in for the Hugging Face Hub's model download API, for `appliance models pull` in tests.

It serves what `huggingface_hub.snapshot_download` asks for, as the Hub documents and answers it:
`GET /api/models/{repo}/revision/{revision}` (the commit `sha` and `siblings`),
`GET /api/models/{repo}/tree/{revision}` (file entries: `type`, `oid`, `size`, `path`), and
`HEAD`/`GET /{repo}/resolve/{revision}/{path}` (the file, with `X-Repo-Commit`, `ETag`, `Content-Length`
and byte ranges). Unknown repositories answer 404 with `X-Error-Code: RepoNotFound`, as the Hub does.

Commands (set from any thread): `fail_file` = a path whose GET answers `fail_status` (default 500), or
None. `downloads` counts the GETs of each file.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from tests.sims.server import LoopbackServer


@dataclass
class HubSimulator(LoopbackServer):
    repos: dict[str, dict[str, bytes]]  # repo id -> path -> content
    fail_file: str | None = None
    fail_status: int = 500
    downloads: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.sha = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in self.repos}

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}/revision/{revision}", self._repo_info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{revision}", self._tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        await self._serve(app)
        return self.url

    def _files(self, request: web.Request) -> tuple[str, dict[str, bytes]]:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        revision = request.match_info["revision"]
        if repo not in self.repos or revision not in ("main", self.sha[repo]):
            raise web.HTTPNotFound(
                text='{"error":"Repository Not Found"}',
                content_type="application/json",
                headers={"X-Error-Code": "RepoNotFound"},
            )
        return repo, self.repos[repo]

    async def _repo_info(self, request: web.Request) -> web.Response:
        repo, files = self._files(request)
        siblings = [{"rfilename": path} for path in sorted(files)]
        return web.json_response({"id": repo, "modelId": repo, "sha": self.sha[repo], "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        _, files = self._files(request)
        entries = [
            {"type": "file", "oid": _oid(content), "size": len(content), "path": path}
            for path, content in sorted(files.items())
        ]
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.Response:
        repo, files = self._files(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        content = files[path]
        headers = {"X-Repo-Commit": self.sha[repo], "ETag": f'"{_oid(content)}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(content))})
        self.downloads[path] += 1
        if path == self.fail_file:
            return web.json_response({"error": "Internal Error"}, status=self.fail_status)
        start = _range_start(request.headers.get("Range"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            return web.Response(body=content[start:], status=206, headers=headers)
        return web.Response(body=content, headers=headers)


def _oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # git's blob id


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header.removeprefix("bytes=").split("-", 1)[0] or 0)
