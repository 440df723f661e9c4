"""What a visitor can send, through every HTTP route the running app exposes (issue 9).

The app runs in this process (the ``running_app`` fixture), so a spy on Pillow and
``pathlib`` can prove that a refused file is never opened. Requests go through the
real routes with plain HTTP, as ``curl`` or a hostile script would send them:
``/gradio_api/call/predict`` (two steps), ``/gradio_api/run/predict`` (one step),
``/gradio_api/queue/join`` + ``/gradio_api/queue/data`` (what the page does) and the
page's private render step.
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid

import httpx
import pytest
from PIL import Image

from cifar_transfer.uploads import REFUSED, UploadGuard, UploadJanitor, upload_folder

from .conftest import EXAMPLES

META = {"_type": "gradio.FileData"}


# -- the routes ------------------------------------------------------------------------


def sse_events(text: str) -> list[tuple[str, object]]:
    events, name = [], None
    for line in text.splitlines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def via_call(url: str, data: list) -> tuple[str, object]:
    """POST /gradio_api/call/predict then GET its event stream; returns (event name, payload) of the last event."""
    with httpx.Client(base_url=url, timeout=120) as http:
        event_id = http.post("gradio_api/call/predict", json={"data": data}).raise_for_status().json()["event_id"]
        return sse_events(http.get(f"gradio_api/call/predict/{event_id}").text)[-1]


def via_run(url: str, data: list, fn_index: int | None = None) -> dict | list:
    body = {"data": data, "session_hash": uuid.uuid4().hex}
    if fn_index is not None:
        body["fn_index"] = fn_index
    with httpx.Client(base_url=url, timeout=120) as http:
        return http.post("gradio_api/run/predict", json=body).json()


def via_queue(url: str, data: list, fn_index: int) -> dict:
    """What the page does: join the queue, then read the session's stream until the event completes."""
    session = uuid.uuid4().hex
    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                 "event_data": None, "trigger_id": None}).raise_for_status()
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
    raise AssertionError("the queue stream ended without process_completed")


def dependencies(url: str) -> list[dict]:
    return httpx.get(url + "config", timeout=60).json()["dependencies"]


def fn_index(url: str, name: str) -> int:
    return next(i for i, d in enumerate(dependencies(url)) if d.get("api_name") == name)


def refusal_text(event: tuple[str, object]) -> str | None:
    name, payload = event
    assert name == "error", f"expected a refusal, got {name}: {str(payload)[:200]}"
    return payload.get("error")


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """Files outside the upload folder and the examples: a distinctive image, a text file, a large file."""
    assert not tmp_path.resolve().is_relative_to(upload_folder())
    image = tmp_path / "secret.png"
    Image.new("RGB", (48, 48), (13, 200, 77)).save(image)
    text = tmp_path / "notes.txt"
    text.write_text("server secrets")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(40 * 2**20)
    return {"image": image, "text": text, "big": big, "missing": tmp_path / "missing.png", "folder": tmp_path}


@pytest.fixture
def opened(monkeypatch):
    """Every path Pillow or pathlib reads while the test runs (the app serves from this process)."""
    seen: list[str] = []
    real_open, real_read = Image.open, pathlib.Path.read_bytes

    def spy_open(fp, *args, **kwargs):
        seen.append(str(fp))
        return real_open(fp, *args, **kwargs)

    def spy_read(self):
        seen.append(str(self))
        return real_read(self)

    monkeypatch.setattr(Image, "open", spy_open)
    monkeypatch.setattr(pathlib.Path, "read_bytes", spy_read)
    return seen


@pytest.fixture
def planted(outside):
    """A symlink and a ``..`` path that start inside the upload folder and end outside it."""
    folder = upload_folder() / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    link = folder / "innocent.png"
    link.symlink_to(outside["image"])
    dotdot = folder / os.path.relpath(outside["image"], folder)
    yield {"symlink": link, "dotdot": dotdot}
    link.unlink()
    folder.rmdir()


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "text", "big", "missing", "folder"])
def test_call_route_refuses_any_path_outside_with_one_message(running_app, outside, opened, kind):
    event = via_call(running_app, [{"path": str(outside[kind])}, ["bgr"]])
    assert refusal_text(event) == REFUSED
    assert not [p for p in opened if str(outside["folder"]) in p], "a refused file was opened"


@pytest.mark.parametrize("route", ["call", "run", "queue"])
@pytest.mark.parametrize("shape", ["no meta", "other meta", "url set", "file url"])
def test_every_route_refuses_every_path_shape(running_app, outside, opened, route, shape):
    path = str(outside["image"])
    payload = {"no meta": {"path": path},
               "other meta": {"path": path, "meta": {"_type": "gradio.Other"}},
               "url set": {"path": path, "url": running_app + "gradio_api/file=" + path},
               "file url": {"path": "file://" + path, "url": "file://" + path}}[shape]
    data = [payload, ["bgr"]]
    if route == "call":
        assert refusal_text(via_call(running_app, data)) == REFUSED
    elif route == "run":
        assert via_run(running_app, data)["error"] == REFUSED
    else:
        message = via_queue(running_app, data, fn_index(running_app, "predict"))
        assert message["success"] is False and message["output"]["error"] == REFUSED
    assert not [p for p in opened if str(outside["folder"]) in p], "a refused file was opened"


def test_path_with_gradios_meta_tag_is_refused_without_detail_and_unopened(running_app, outside, opened):
    """With the ``meta`` tag Gradio's own upload check refuses first; the answer is the app's one sentence."""
    for kind in ("image", "missing"):
        name, payload = via_call(running_app, [{"path": str(outside[kind]), "meta": META}, []])
        assert name == "error" and payload["error"] == REFUSED
    assert not [p for p in opened if str(outside["folder"]) in p]


@pytest.mark.parametrize("kind", ["symlink", "dotdot"])
def test_paths_that_leave_the_upload_folder_are_refused(running_app, planted, outside, opened, kind):
    assert str(planted[kind]).startswith(str(upload_folder()))
    assert refusal_text(via_call(running_app, [{"path": str(planted[kind])}, []])) == REFUSED
    assert not [p for p in opened if str(outside["folder"]) in p or "innocent" in p]


def test_the_render_step_shows_nothing_a_client_forges(running_app, outside):
    """The page's private render step reads the server-side state only: a forged one shows nothing."""
    index = next(i for i, d in enumerate(dependencies(running_app)) if d.get("api_name") == "render")
    forged = {"result": {"variants": [{"key": "correct", "confidences": {"secret": 1.0},
                                       "meter": {"divergence": 0, "level": "ok", "colour": "red", "words": "x"}}],
                         "warning": None, "notes": []},
              "pictures": [str(outside["image"])]}
    answer = json.dumps(via_run(running_app, [forged, []], fn_index=index))
    assert "secret" not in answer and str(outside["folder"]) not in answer


def test_uploaded_file_and_example_are_admitted(running_app, example_images):
    from gradio_client import Client, handle_file

    client = Client(running_app, verbose=False)
    result = client.predict(handle_file(str(example_images[0])), ["bgr"], api_name="/predict")
    assert [v["key"] for v in result["variants"]] == ["correct", "bgr"]
    name, payload = via_call(running_app, [{"path": str(example_images[1])}, []])
    assert name == "complete" and payload[0]["variants"][0]["key"] == "correct"


@pytest.mark.parametrize("variants, message", [
    (["foo"], "Unknown variant 'foo'; choose from"),
    ("bgr", "The variants must be a list of keys, e.g. [\"bgr\"], not 'bgr'"),
    ([1, None], "Unknown variant 1, None; choose from"),
    (["x" * 1_000_000], "Unknown variant '" + "x" * 38 + "…; choose from"),
    ([["bgr"]], "Unknown variant ['bgr']; choose from"),
    (["bgr"] * 100, "At most 14 variants can be asked for at once; got 100."),
])
def test_variant_lists_get_plain_short_messages(running_app, variants, message):
    text = refusal_text(via_call(running_app, [{"path": str(sorted(EXAMPLES.glob("*.png"))[0])}, variants]))
    assert text.startswith(message)
    assert len(text) < 300
    assert "type: <class" not in text and "list of choices" not in text


def test_null_variants_mean_the_defaults(running_app, example_images):
    from cifar_transfer.contract import DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS

    name, payload = via_call(running_app, [{"path": str(example_images[0])}, None])
    assert name == "complete"
    assert [v["key"] for v in payload[0]["variants"]] == ["correct", *(k for k in WRONG_VARIANTS if k in DEFAULT_DEMO_VARIANTS)]


def test_refusal_carries_the_apps_title(running_app, outside):
    name, payload = via_call(running_app, [{"path": str(outside["image"])}, []])
    assert payload["title"] == "Cannot classify this input"


def test_page_and_config_name_no_server_path(running_app):
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    config = httpx.get(running_app + "config", timeout=60).text
    page = httpx.get(running_app, timeout=60).text
    assert repo not in config and repo not in page
    assert "checkpoints/efficientnet_lite0-cifar10" in config


# -- the guard and the janitor, directly ----------------------------------------------------


def test_guard_admits_only_regular_files_under_its_roots(tmp_path):
    root, other = tmp_path / "uploads", tmp_path / "other"
    root.mkdir(), other.mkdir()
    inside = root / "a.png"
    inside.write_bytes(b"x")
    (other / "b.png").write_bytes(b"y")
    (root / "link.png").symlink_to(other / "b.png")
    (root / "inner").mkdir()
    os.mkfifo(root / "pipe.png")
    guard = UploadGuard([root])
    assert guard.check(inside) == inside.resolve()
    assert guard.check(root / "inner" / ".." / "a.png") == inside.resolve()
    for bad in [other / "b.png", root / "link.png", root / ".." / "other" / "b.png", root / "missing.png",
                root / "inner", root / "pipe.png", "file://" + str(inside), "a\0b", ""]:
        with pytest.raises(PermissionError) as err:
            guard.check(bad)
        assert str(err.value) == REFUSED


def _age(path, seconds, now):
    os.utime(path, (now - seconds, now - seconds))


def test_janitor_removes_abandoned_partial_uploads_and_old_files_and_keeps_the_rest(tmp_path):
    now = 1_000_000.0
    partial_old, partial_new = tmp_path / "tmpabc", tmp_path / "tmpdef"
    (tmp_path / "hash1").mkdir()
    upload_old, upload_new, example = tmp_path / "hash1" / "old.png", tmp_path / "hash1" / "new.png", tmp_path / "ex.png"
    for path, age in [(partial_old, 601), (partial_new, 30), (upload_old, 6 * 3600 + 1), (upload_new, 3600),
                      (example, 10 * 86400)]:
        path.write_bytes(b"z" * 1000)
        _age(path, age, now)
    janitor = UploadJanitor(tmp_path, keep=lambda: [example], partial_age=600, upload_age=6 * 3600, max_bytes=10**9)
    counts = janitor.sweep(now=now)
    assert counts == {"removed": 2, "removed_bytes": 2000, "kept_bytes": 2000}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ex.png", "new.png", "tmpdef"]


def test_janitor_caps_total_size_oldest_first(tmp_path):
    now = 1_000_000.0
    for i in range(5):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"z" * 1000)
        _age(path, 100 - i, now)  # f0 is the oldest
    counts = UploadJanitor(tmp_path, partial_age=10**6, upload_age=10**6, max_bytes=2500).sweep(now=now)
    assert counts["kept_bytes"] == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f3", "f4"]


def test_refusal_holds_after_an_example_updated_the_session(running_app, outside, opened):
    """Clicking an example replaces the image component in the session's state; the check must survive it."""
    deps = dependencies(running_app)
    load_example = next(i for i, d in enumerate(deps) if d.get("api_name") == "load_example")
    predict = fn_index(running_app, "predict")
    session = uuid.uuid4().hex
    with httpx.Client(base_url=running_app, timeout=120) as http:
        for index, data in [(load_example, [1]), (predict, [{"path": str(outside["image"])}, []])]:
            http.post("gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session,
                                                     "event_data": None, "trigger_id": None}).raise_for_status()
            if index == load_example and not deps[index].get("queue", True):
                continue
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            messages = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    done = [m for m in messages if m.get("msg") == "process_completed"]
    assert done and done[-1]["success"] is False and done[-1]["output"]["error"] == REFUSED
    assert not [p for p in opened if str(outside["folder"]) in p], "a refused file was opened"


def test_hostile_corpus_through_the_upload_route_as_a_browser_sends_it(running_app, tmp_path, example_images):
    """Each odd or hostile file, uploaded under its (hostile) name and classified through /call/predict:
    the expected outcome, no server path in any answer, and a normal request still works after each."""
    from .hostile_corpus import CLASSIFIED, make_corpus

    cases = make_corpus(tmp_path)
    assert len(cases) >= 40
    folder = str(upload_folder())
    with httpx.Client(base_url=running_app, timeout=120) as http:
        for case in cases:
            files = {"files": (case.name, case.path.read_bytes(), "application/octet-stream")}
            uploaded = http.post("gradio_api/upload", files=files)
            assert uploaded.status_code == 200, (case.name, uploaded.text[:200])
            path = uploaded.json()[0]
            name, payload = via_call(running_app, [{"path": path, "meta": META, "orig_name": case.name}, []])
            if case.expect == CLASSIFIED:
                assert name == "complete", (case.name, payload)
                assert payload[0]["variants"][0]["key"] == "correct"
                if case.substring:
                    assert any(case.substring in note for note in payload[0]["notes"]), (case.name, payload[0]["notes"])
            else:
                assert name == "error" and (payload.get("error") or "").strip(), (case.name, payload)
                assert case.substring is None or case.substring in payload["error"], (case.name, payload)
            assert folder not in json.dumps(payload) and str(tmp_path) not in json.dumps(payload)
            after_name, after = via_call(running_app, [{"path": str(example_images[0])}, []])
            assert after_name == "complete", (case.name, after)
