"""Nothing shared, nothing unbounded (issue 21): request sizes, what a session keeps, deep links,
the page's internal events, the upload route's answers, a taken port. Every test goes through the
running app's real HTTP routes (the ``running_app`` fixture) or the real command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from cifar_transfer.http_limits import MAX_BODY_BYTES, MAX_UPLOAD_BODY_BYTES, UPLOAD_LOST
from cifar_transfer.sessions import MAX_STORED_VALUE_BYTES
from cifar_transfer.uploads import REFUSED, UploadJanitor, upload_folder

from .conftest import EXAMPLES, REPO
from .test_app_security import META, dependencies, fn_index, via_call, via_queue

SECRET = "zebra-7731"  # a string only the first visitor ever sends


def join(http: httpx.Client, session: str | None, fn: int, data: list):
    body = {"data": data, "fn_index": fn, "event_data": None, "trigger_id": None}
    if session is not None:
        body["session_hash"] = session
    return http.post("gradio_api/queue/join", json=body)


def queue_messages(http: httpx.Client, session: str) -> list[dict]:
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        return [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]


def deep_link_state(http: httpx.Client, session: str) -> str:
    link = http.get("gradio_api/deep_link", params={"session_hash": session}).json()
    assert link, "no deep link for a live session"
    return (upload_folder() / "deep_links" / link / "state.json").read_text()


# -- request sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["gradio_api/queue/join", "gradio_api/call/predict", "gradio_api/run/predict"])
@pytest.mark.parametrize("chunked", [False, True], ids=["with length", "chunked"])
def test_a_body_over_the_limit_gets_413_and_one_sentence(running_app, route, chunked):
    body = json.dumps({"data": [{"path": "x.png", "url": "data:image/png;base64," + "A" * MAX_BODY_BYTES}, []],
                       "fn_index": fn_index(running_app, "predict"), "session_hash": uuid.uuid4().hex}).encode()
    content = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
    r = httpx.post(running_app + route, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert r.text.startswith("This request is larger than the app accepts (2 MB)") and "\n" not in r.text


def test_a_body_under_the_limit_still_reaches_the_app(running_app):
    """A pasted image as a data: URL (an API caller's route) is classified as before."""
    import base64

    png = (EXAMPLES / "cat_cifar10-test-00.png").read_bytes()
    name, payload = via_call(running_app, [{"path": "pasted.png", "url": "data:image/png;base64,"
                                            + base64.b64encode(png).decode()}, ["bgr"]])
    assert name == "complete" and [v["key"] for v in payload[0]["variants"]] == ["correct", "bgr"]


def test_an_upload_over_its_limit_gets_413_before_it_is_read(running_app):
    files = {"files": ("big.png", b"\0" * (MAX_UPLOAD_BODY_BYTES + 1), "image/png")}
    r = httpx.post(running_app + "gradio_api/upload", files=files, timeout=60)
    assert r.status_code == 413 and "larger than the app accepts (26 MB)" in r.text


# -- what a session keeps, and deep links ----------------------------------------------------


def test_a_deep_link_keeps_no_outside_url_and_no_pasted_data(running_app):
    """The session's kept image is only a file the app holds: never a client's URL, never a data: URL."""
    import base64

    predict = fn_index(running_app, "predict")
    cat = str(EXAMPLES / "cat_cifar10-test-00.png")
    pasted = "data:image/png;base64," + base64.b64encode((EXAMPLES / "cat_cifar10-test-00.png").read_bytes()).decode()
    with httpx.Client(base_url=running_app, timeout=120) as http:
        for image, variants, kept in [({"path": cat, "url": "https://tracker.example/pixel.png"}, ["bgr"], True),
                                      ({"path": "pasted.png", "url": pasted}, ["bgr"], False),
                                      ({"path": cat}, ["bgr", "x" * (MAX_STORED_VALUE_BYTES * 50)], True)]:
            session = uuid.uuid4().hex
            join(http, session, predict, [image, variants]).raise_for_status()
            queue_messages(http, session)
            state = deep_link_state(http, session)
            for kept_out in ("tracker.example", "data:image", "xxxxxxxx"):
                assert kept_out not in state, state[max(0, state.find(kept_out) - 300):state.find(kept_out) + 50]
            images = [c["props"]["value"] for c in json.loads(state)
                      if c.get("props", {}).get("label") == "Your image"]
            assert images and (images[0] is not None) == kept
            if kept:
                assert images[0]["url"].startswith("/gradio_api/file=") and images[0]["url"].endswith("cat_cifar10-test-00.png")
            choices = [c["props"]["value"] for c in json.loads(state)
                       if c.get("props", {}).get("label") == "Wrong variants to compare"]
            assert choices == [["bgr"]]


def test_every_event_called_from_another_session_returns_nothing_of_the_first(running_app):
    """A first visitor's refusal and answer; then every fn_index, with null data, from a fresh session,
    from no session at all, through /run and through the queue: none of it comes back."""
    deps = dependencies(running_app)
    predict = fn_index(running_app, "predict")
    with httpx.Client(base_url=running_app, timeout=120) as http:
        victim = uuid.uuid4().hex
        for data in ([{"path": str(EXAMPLES / "cat_cifar10-test-00.png")}, [f"<{SECRET}>"]],
                     [{"path": str(EXAMPLES / "ship_cifar10-test-01.png")}, ["bgr"]],
                     [{"path": str(EXAMPLES / "cat_cifar10-test-00.png")}, [f"<{SECRET}>"]]):
            join(http, victim, predict, data).raise_for_status()
            messages = queue_messages(http, victim)
        assert any(SECRET in json.dumps(m) for m in messages), "the first visitor's refusal did not name the secret"
        for route in ("gradio_api/run/predict", "gradio_api/call/predict"):  # API callers that name no session
            http.post(route, json={"data": [{"path": str(EXAMPLES / "cat_cifar10-test-00.png")}, [f"<{SECRET}>"]]})
        answers = []
        for index, dep in enumerate(deps):
            nulls = [None] * max(1, len(dep.get("inputs", [])))
            for session in (uuid.uuid4().hex, None):
                body = {"data": nulls, "fn_index": index}
                if session:
                    body["session_hash"] = session
                answers.append(http.post("gradio_api/run/predict", json=body).text)
            attacker = uuid.uuid4().hex
            if join(http, attacker, index, nulls).status_code == 200:
                answers.extend(json.dumps(m) for m in queue_messages(http, attacker))
    leaked = [a[:200] for a in answers if SECRET in a or "ship" in a.lower()]
    assert not leaked, leaked


# -- messages -------------------------------------------------------------------------------


def test_a_path_with_gradios_meta_tag_gets_the_apps_one_sentence(running_app, tmp_path):
    """Gradio's own upload check refuses these first; the answer is the app's sentence, as without meta."""
    for path in ("/etc/passwd", str(tmp_path / "missing.png"), str(upload_folder() / "missing" / "x.png")):
        name, payload = via_call(running_app, [{"path": path, "meta": META}, []])
        assert name == "error" and payload["error"] == REFUSED and payload["title"] == "Cannot classify this input"
        message = via_queue(running_app, [{"path": path, "meta": META}, []], fn_index(running_app, "predict"))
        assert message["output"]["error"] == REFUSED


def test_api_callers_get_plain_text_not_html_escaped(running_app):
    name, payload = via_call(running_app, [{"path": str(EXAMPLES / "cat_cifar10-test-00.png")}, ["<b>&"]])
    assert name == "error" and "'<b>&'" in payload["error"] and "&lt;" not in payload["error"]


def test_an_upload_whose_partial_file_was_swept_is_answered_408_not_a_missing_path(running_app):
    """An upload that stalls past the janitor's partial-upload age, then finishes: 408 and a sentence."""
    host, port = running_app.split("//")[1].strip("/").split(":")
    boundary = "x" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"slow.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    payload = (EXAMPLES / "cat_cifar10-test-00.png").read_bytes() + b"\0" * 200_000
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + payload + tail
    before = {p.name for p in upload_folder().glob("tmp*")}
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                   f"boundary={boundary}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode())
        s.sendall(body[:100_000])
        for _ in range(100):  # until Gradio has opened its partial file
            if {p.name for p in upload_folder().glob("tmp*")} - before:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no partial upload file appeared")
        UploadJanitor(upload_folder(), partial_age=0, upload_age=1e9, max_bytes=10**12).sweep()
        s.sendall(body[100_000:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, text = answer.split(b"\r\n", 1)[0], answer.split(b"\r\n\r\n", 1)[1].decode()
    assert b" 408 " in status and text == UPLOAD_LOST


def test_a_taken_port_ends_in_one_line_naming_the_port_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "GRADIO_SERVER_PORT": "", "CIFAR_TRANSFER_THREADS": "1"}
        env.pop("GRADIO_SERVER_PORT")
        proc = subprocess.run([sys.executable, str(REPO / "app.py"), "--port", str(port)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:" + str(port)), proc.stderr[-2000:]
    assert "--port" in lines[0] and "Traceback" not in proc.stderr
