"""What a visitor's session may keep on the server, and how Gradio's own path check answers.

Gradio keeps, per browser session, the last value each input component received,
exactly as the client sent it: ``GET /gradio_api/deep_link`` writes those values
to a ``state.json`` that a shared link reopens. Unchecked, a session holds a
30 MB ``data:`` URL or a 30 MB variant string for as long as it lives, and a link
makes its visitor's browser fetch whatever outside ``url`` the image carried.
:class:`BoundedBlocks` is ``gr.Blocks`` with two changes at the one place every
route passes through (``preprocess_data``):

* after each event, each input's kept value is replaced by what the component's
  ``stored_value`` makes of it (the image: only a file the app holds, with no
  outside URL; see ``gradio_inputs``), and any value still larger than
  :data:`MAX_STORED_VALUE_BYTES` is dropped;
* a file reference that Gradio's own upload check refuses (one sent with its
  ``meta`` tag) gets the app's one sentence and one log line, like every other
  refused path, instead of Gradio's null "Error" and a traceback.

The number of sessions kept is bounded by ``launch(state_session_capacity=...)``
(see ``app.SESSIONS``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr
from gradio.exceptions import InvalidPathError
from pydantic import ValidationError

from .uploads import REFUSED

log = logging.getLogger(__name__)

# A kept input value larger than this is dropped: the app's own values (a file reference, a list
# of variant keys) take a few hundred bytes.
MAX_STORED_VALUE_BYTES = 16 * 1024
REFUSED_TITLE = "Cannot classify this input"
NOT_A_FILE = 'The image must be a file reference ({"path": ...}) from /gradio_api/upload, or a data: URL.'


def bound_stored_inputs(state, inputs) -> None:
    """Replace each input's kept value in ``state`` (a Gradio ``SessionState``) by its bounded form."""
    for block in inputs:
        props = (state.config_values.get(block._id) or {}).get("props")
        if not props or props.get("value") is None:
            continue
        stored = getattr(block, "stored_value", None)
        value = stored(props["value"]) if stored else props["value"]
        if value is not None and len(json.dumps(value, default=str)) > MAX_STORED_VALUE_BYTES:
            value = None
        props["value"] = value


class BoundedBlocks(gr.Blocks):
    """``gr.Blocks`` whose sessions keep bounded, app-held values; see the module doc."""

    async def preprocess_data(self, block_fn, inputs: list[Any], state, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except (InvalidPathError, OSError):
            log.warning("refused a file reference Gradio's upload check did not admit")
            raise gr.Error(REFUSED, title=REFUSED_TITLE, print_exception=False, visible=False) from None
        except ValidationError:
            log.warning("refused a malformed file reference")
            raise gr.Error(NOT_A_FILE, title=REFUSED_TITLE, print_exception=False, visible=False) from None
        finally:
            if state is not None:
                bound_stored_inputs(state, block_fn.inputs)
