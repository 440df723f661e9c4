"""Bounds on what one HTTP request may cost the server, as an ASGI middleware.

Gradio reads a JSON request body whole into memory and keeps what a session sent
(see ``cifar_transfer.sessions``), so without a bound one ``POST`` with a 200 MB
``data:`` URL costs hundreds of MB. :class:`RequestLimits` answers a body over its
route's limit with ``413`` and one plain sentence *before the body is read* when the
client says its length, and as soon as the limit is crossed when it streams the body
in chunks; nothing of such a request reaches Gradio.

It also checks the answer of Gradio's upload route: an upload that stalled long
enough for the janitor (``cifar_transfer.uploads``) to remove its partial file, and
then finished, would otherwise be answered ``200`` with a path that no longer exists.
Such an answer becomes ``408`` with a sentence asking to send the file again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

UPLOAD_ROUTE = "/gradio_api/upload"
# The page sends a few hundred bytes of JSON per event; an API caller may paste an image as a
# data: URL, so 2 MiB admits one of about 1.5 MB. Larger images go through the upload route.
MAX_BODY_BYTES = 2 * 2**20
# The upload route: the app's 25 MB file limit (app.MAX_UPLOAD) plus 1 MiB of multipart framing.
MAX_UPLOAD_BODY_BYTES = 26 * 2**20
# Gradio answers an upload with a JSON list of paths; a larger answer is not one of those.
MAX_UPLOAD_ANSWER_BYTES = 1 * 2**20

TOO_LARGE = ("This request is larger than the app accepts ({limit}); send images of up to 25 MB through "
             "/gradio_api/upload, or a pasted data: URL of up to {json_limit}.")
UPLOAD_LOST = "The upload took too long and was discarded; please send the file again."


def megabytes(n: int) -> str:
    return f"{n / 2**20:g} MB"


class RequestLimits:
    """ASGI middleware: per-route body limits and the upload answer check (see the module doc)."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES, max_upload_body: int = MAX_UPLOAD_BODY_BYTES,
                 root_path: str = ""):
        self.app, self.max_body, self.max_upload_body = app, max_body, max_upload_body
        self.upload_route = root_path.rstrip("/") + UPLOAD_ROUTE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope.get("path", "").rstrip("/") == self.upload_route
        limit = self.max_upload_body if upload else self.max_body
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await self._refuse(send, limit)
        seen, over = 0, False

        async def counted_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body past the limit: the app sees the client leave
                    over = True
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def guarded_send(message):
            nonlocal started
            if over:  # whatever the app answers to a cut-off body is replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        check_answer = upload and scope.get("method") == "POST"
        try:
            await self.app(scope, counted_receive, _UploadAnswerCheck(guarded_send) if check_answer else guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, limit)

    async def _refuse(self, send, limit: int) -> None:
        text = TOO_LARGE.format(limit=megabytes(limit), json_limit=megabytes(self.max_body)).encode()
        await _plain(send, 413, text)


class _UploadAnswerCheck:
    """Holds back the upload route's answer until every path in it is checked to exist."""

    def __init__(self, send):
        self.send, self.start, self.body = send, None, b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body" or self.start is None:
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body") and len(self.body) <= MAX_UPLOAD_ANSWER_BYTES:
            return
        if self.start["status"] == 200 and not _all_paths_exist(self.body):
            return await _plain(self.send, 408, UPLOAD_LOST.encode())
        await self.send(self.start)
        await self.send({"type": "http.response.body", "body": self.body, "more_body": message.get("more_body", False)})
        self.start = None  # anything after this (an over-long answer's rest) passes straight through


def _all_paths_exist(body: bytes) -> bool:
    try:
        paths = json.loads(body)
    except ValueError:
        return True  # not Gradio's list of paths: nothing to check
    if not isinstance(paths, list):
        return True
    return all(isinstance(p, str) and Path(p).is_file() for p in paths)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _plain(send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": text})


def limits_from_env(env=os.environ) -> dict[str, int]:
    """``RequestLimits`` keyword arguments from ``CIFAR_TRANSFER_MAX_BODY_MB`` (the JSON routes)."""
    mb = env.get("CIFAR_TRANSFER_MAX_BODY_MB")
    return {"max_body": int(float(mb) * 2**20)} if mb else {}
