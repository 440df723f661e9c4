"""A loopback Hugging Face Hub for tests: the subset of the Hub's HTTP API that
``huggingface_hub`` uses to create a model repo, commit files to it (regular
files inline, LFS files through the batch API and a separate storage origin)
and download them again (``repo_info``, tree listing, ``/resolve``).

Two HTTP servers on 127.0.0.1 share one in-memory state: the *Hub* origin
(``endpoint``; point ``HF_ENDPOINT`` at it) and a *storage* origin standing in
for S3/CloudFront, which LFS uploads and downloads are redirected to, exactly as
on the real Hub (so the client drops its ``Authorization`` header there).

Test-only code: never shipped, never imported by the package.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n" \
                b"*.pt filter=lfs diff=lfs merge=lfs -text\n*.pth filter=lfs diff=lfs merge=lfs -text\n"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS whatever .gitattributes says


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    """A file in a commit: inline content, or a pointer to an LFS object."""

    size: int
    content: bytes | None = None
    lfs: str | None = None  # sha256 of the LFS object

    @property
    def blob(self) -> bytes:
        return self.content if self.lfs is None else lfs_pointer(self.lfs, self.size)


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit oid -> its files
    messages: dict[str, str] = field(default_factory=dict)  # commit oid -> summary

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class HubError(Exception):
    """An error answer, as the Hub gives it: status, X-Error-Code / X-Error-Message headers, JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class LoopbackHub:
    """In-memory Hub state plus the two servers. ``tokens`` maps a token to its user name."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS storage, by sha256
        self.requests: list[dict] = []  # every request: origin, method, path, authorization seen or not
        self.failures: dict[str, int] = {}  # route name -> HTTP status to answer once (fault injection)
        self.lock = threading.RLock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "LoopbackHub":
        for origin in ("hub", "storage"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, origin))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.storage = f"http://127.0.0.1:{self._servers[1].server_port}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    # -- seeding and inspection (for tests) -----------------------------------------------
    def create(self, repo_id: str, owner: str | None = None, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(owner or repo_id.split("/")[0], private)
            self._commit(repo, "main", {".gitattributes": Entry(len(GITATTRIBUTES), GITATTRIBUTES)}, "initial commit", fresh=True)
            if files:
                self._commit(repo, "main", {p: Entry(len(b), b) for p, b in files.items()}, "seed files")
            return repo

    def file_bytes(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        repo = self.repos[repo_id]
        entry = repo.commits[repo.resolve(rev)][path]
        return self.objects[entry.lfs] if entry.lfs else entry.content

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Entry]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def _commit(self, repo: Repo, branch: str, changes: dict[str, Entry | None], message: str, fresh: bool = False) -> str:
        files = {} if fresh else dict(repo.commits[repo.branches[branch]])
        for path, entry in changes.items():
            if entry is None:
                files.pop(path, None)
            else:
                files[path] = entry
        oid = hashlib.sha1(f"{time.time_ns()}{len(repo.commits)}{sorted(files)}".encode()).hexdigest()
        repo.commits[oid], repo.messages[oid] = files, message
        repo.branches[branch] = oid
        return oid

    # -- access control -------------------------------------------------------------------
    def user(self, headers) -> str | None:
        auth = headers.get("authorization") or ""
        if not auth:
            return None
        user = self.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        repo = self.readable(repo_id, user)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def revision(repo: Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    # -- Hub API routes: (method, pattern, name) -> handler(match, request) -> response -----------
    def create_repo(self, m, req):
        user = self.user(req.headers)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        body = req.json()
        if body.get("type", "model") != "model":
            raise HubError(400, "this loopback Hub only hosts model repos")
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", body={"url": f"{self.endpoint}/{repo_id}"})
            self.create(repo_id, user, private=body.get("visibility") == "private" or bool(body.get("private")))
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}

    def delete_repo(self, m, req):
        body = req.json()
        repo_id = f"{body.get('organization') or self.user(req.headers)}/{body['name']}"
        with self.lock:
            self.writable(repo_id, self.user(req.headers))
            del self.repos[repo_id]
        return 200, {}

    def validate_yaml(self, m, req):
        content = req.json().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            return 400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, m, req):
        repo = self.writable(m["repo"], self.user(req.headers))
        files = self.files(m["repo"], self.revision(repo, m["rev"]))
        patterns = [line.split()[0] for line in (files.get(".gitattributes") or Entry(0, b"")).blob.decode().splitlines()
                    if "filter=lfs" in line]
        out = []
        for f in req.json()["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["size"] > LFS_THRESHOLD or b"\0" in sample or any(fnmatch.fnmatch(f["path"], p) for p in patterns)
            old = files.get(f["path"])
            oid = None if old is None else (old.lfs or git_blob_sha1(old.blob))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": repo.resolve(m["rev"])}

    def lfs_batch(self, m, req):
        self.writable(m["repo"], self.user(req.headers))
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "this loopback Hub only accepts LFS uploads through the batch API")
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.storage}/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{m['repo']}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_verify(self, m, req):
        self.writable(m["repo"], self.user(req.headers))
        body = req.json()
        data = self.objects.get(body["oid"])
        if data is None or len(data) != body["size"] or hashlib.sha256(data).hexdigest() != body["oid"]:
            raise HubError(404, f"LFS object {body['oid']} not found or corrupt")
        return 200, {}

    def commit(self, m, req):
        repo = self.writable(m["repo"], self.user(req.headers))
        branch = m["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        header, changes = lines[0], {}
        if header.get("key") != "header" or not header["value"].get("summary"):
            raise HubError(400, "the commit needs a header line with a summary")
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = Entry(len(data), data)
            elif line["key"] == "lfsFile":
                data = self.objects.get(value["oid"])
                if data is None or hashlib.sha256(data).hexdigest() != value["oid"]:
                    raise HubError(400, f"LFS file {value['path']} was not uploaded (oid {value['oid']})")
                changes[value["path"]] = Entry(len(data), lfs=value["oid"])
            elif line["key"] == "deletedFile":
                changes[value["path"]] = None
            else:
                raise HubError(400, f"this loopback Hub does not support commit operation {line['key']!r}")
        with self.lock:
            parent = header["value"].get("parentCommit")
            if parent and parent != repo.branches[branch]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            oid = self._commit(repo, branch, changes, header["value"]["summary"])
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{m['repo']}/commit/{oid}",
                     "pullRequestUrl": None}

    def create_branch(self, m, req):
        repo = self.writable(m["repo"], self.user(req.headers))
        start = (req.json() or {}).get("startingPoint") or "main"
        with self.lock:
            if m["branch"] in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{m['branch']}")
            repo.branches[m["branch"]] = self.revision(repo, start)
        return 200, {}

    def repo_info(self, m, req):
        repo = self.readable(m["repo"], self.user(req.headers))
        oid = self.revision(repo, m["rev"] or "main")
        return 200, {"id": m["repo"], "modelId": m["repo"], "author": repo.owner, "sha": oid, "private": repo.private,
                     "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])], "tags": [], "downloads": 0, "likes": 0}

    def tree(self, m, req):
        repo = self.readable(m["repo"], self.user(req.headers))
        files = repo.commits[self.revision(repo, m["rev"])]
        prefix = (m["path"] or "").strip("/")
        out = []
        for path, entry in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            item = {"type": "file", "oid": git_blob_sha1(entry.blob), "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.lfs, "size": entry.size, "pointerSize": len(entry.blob)}
            out.append(item)
        return 200, out

    def resolve(self, m, req):
        repo = self.readable(m["repo"], self.user(req.headers))
        oid = self.revision(repo, m["rev"])
        entry = repo.commits[oid].get(m["path"])
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        if entry.lfs:
            return 302, b"", {"Location": f"{self.storage}/objects/{entry.lfs}", "X-Repo-Commit": oid,
                              "X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size),
                              "ETag": f'"{git_blob_sha1(entry.blob)}"'}
        return 200, entry.content, {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha1(entry.content)}"'}

    # -- storage origin ------------------------------------------------------------------
    def storage_put(self, m, req):
        with self.lock:
            self.objects[m["oid"]] = req.body
        return 200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'}

    def storage_get(self, m, req):
        data = self.objects.get(m["oid"])
        if data is None:
            raise HubError(404, "NoSuchKey")
        start = int(re.match(r"bytes=(\d+)-", req.headers.get("range", "bytes=0-")).group(1))
        return (206 if start else 200), data[start:], {"ETag": f'"{m["oid"]}"'}


REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
HUB_ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
STORAGE_ROUTES = [
    ("PUT", r"/upload/(?P<oid>[0-9a-f]{64})", "storage_put"),
    ("GET", r"/objects/(?P<oid>[0-9a-f]{64})", "storage_get"),
]


class _Request:
    def __init__(self, handler: BaseHTTPRequestHandler, body: bytes):
        self.headers = {k.lower(): v for k, v in handler.headers.items()}
        self.query = {k: v[-1] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        self.body = body

    def json(self):
        return json.loads(self.body or b"null")


def _handler(hub: LoopbackHub, origin: str):
    routes = [(method, re.compile(f"^{pattern}$"), name) for method, pattern, name in
              (HUB_ROUTES if origin == "hub" else STORAGE_ROUTES)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body, headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if not isinstance(body, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _dispatch(self) -> None:
            body = self._body()
            path = urlsplit(self.path).path
            hub.requests.append({"origin": origin, "method": self.command, "path": path,
                                 "authorization": "Authorization" in self.headers})
            method = "GET" if self.command == "HEAD" else self.command
            for route_method, pattern, name in routes:
                m = pattern.match(path)
                if route_method == method and m:
                    break
            else:
                return self._send(404, {"error": f"loopback Hub: no route for {self.command} {path}"})
            match = {k: (unquote(v) if v is not None else None) for k, v in m.groupdict().items()}
            try:
                if name in hub.failures:
                    raise HubError(hub.failures.pop(name), f"injected failure in {name}")
                result = getattr(hub, name)(match, _Request(self, body))
            except HubError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                return self._send(err.status, {"error": err.message, **err.body}, headers)
            except Exception as exc:  # noqa: BLE001 - a bug in this server: answer 500 so the test shows it
                return self._send(500, {"error": f"loopback Hub failed: {exc!r}"})
            status, payload, *headers = result
            self._send(status, payload, headers[0] if headers else None)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    return Handler
