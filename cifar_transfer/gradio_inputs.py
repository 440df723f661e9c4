"""The demo's two input components, with preprocessing the app controls.

Gradio preprocesses an input with the component's class method, and when an event
updates a component (clicking an example does) it puts ``type(block)(**constructor
args)`` in that session's state and preprocesses with that copy from then on. So the
app's checks live on subclasses and reach them as constructor arguments, which
survive such a copy; an override set on one instance would not. Gradio's component
metaclass writes a ``.pyi`` stub beside the file that defines a subclass: the
generated ``gradio_inputs.pyi`` is committed, so nothing is written at run time.
"""

from __future__ import annotations

import base64
import binascii
import inspect
from typing import Any, Callable

import gradio as gr
from gradio_client.utils import encode_file_path

# The URL under which Gradio serves a file it holds: a kept image value carries only this, built from its path.
FILE_URL = "/gradio_api/file="
MAX_NAME = 255  # characters of a file's original name kept (a file system's own limit)


class PathCheckedImage(gr.Image):
    """A ``gr.Image`` whose value reaches the function as a checked path or the pasted bytes, unopened.

    ``check_path(path)`` returns the path to use or an exception to hand on. Gradio's own
    preprocess would open any path a caller names (the API accepts a ``FileData`` without its
    ``meta`` tag, which skips Gradio's upload check) and fails on a bad file with an unclear
    message. A refusal is returned, not raised, so the function reports it like any bad input.
    """

    is_template = True  # the page draws it as a plain gr.Image

    def __init__(self, *args, check_path: Callable[[str], Any] | None = None, **kwargs):
        self._check_path = check_path
        kwargs["type"] = "filepath"
        super().__init__(*args, **kwargs)

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            try:
                return base64.b64decode(payload.url.split(",", 1)[1], validate=True)
            except (IndexError, binascii.Error):
                return ValueError("The pasted image data could not be read.")
        if self._check_path is None:
            return ValueError("This input accepts no file paths.")
        return self._check_path(payload.path)

    def stored_value(self, value):
        """What the session keeps of a value (see ``cifar_transfer.sessions``): a file the app holds, under
        this server's own file URL, or nothing. A pasted ``data:`` URL and any ``url`` the client sent are
        dropped, so a deep link never reopens them."""
        path = value.get("path") if isinstance(value, dict) else None
        if not isinstance(path, str) or self._check_path is None or isinstance(self._check_path(path), Exception):
            return None
        name = value.get("orig_name")
        return {"path": path, "url": FILE_URL + encode_file_path(path),
                "size": value.get("size") if isinstance(value.get("size"), int) else None,
                "orig_name": name[:MAX_NAME] if isinstance(name, str) else None,
                "mime_type": None, "is_stream": False, "meta": {"_type": "gradio.FileData"}}


def _with_keyword(function, base_init, name: str) -> None:
    """Give ``function`` the signature of ``base_init`` plus keyword ``name``: Gradio reads a
    component's settings (its page config, the copies described above) from that signature."""
    signature = inspect.signature(base_init)
    params = list(signature.parameters.values())
    extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    function.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])


_with_keyword(PathCheckedImage.__init__, gr.Image.__init__, "check_path")


class UncheckedChoices(gr.CheckboxGroup):
    """A ``gr.CheckboxGroup`` whose value reaches the function exactly as sent; the function checks it.

    Gradio's own check answers a wrong key with its internal message ("Value: ... is not in the
    list of choices"), walks a string letter by letter and fails on ``null``.
    """

    is_template = True

    def preprocess(self, payload):
        return payload

    def stored_value(self, value):
        """What the session keeps (see ``cifar_transfer.sessions``): the known keys sent, nothing else."""
        known = {choice[1] for choice in self.choices}
        return [v for v in value if isinstance(v, str) and v in known] if isinstance(value, list) else None
