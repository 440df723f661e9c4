"""What a checkpoint reference can be, and why the Hugging Face Hub cannot give it.

A repo id's syntax (:func:`could_be_repo_id`), whether the Hub answers now (:func:`hub_unreachable`, one
request) and one line for any Hub error (:func:`describe_hub_error`). It imports nothing of this package,
so the model (``from_pretrained``) and the reference resolver (``hub``) both use it without a cycle.
"""

from __future__ import annotations

import re

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailable(RuntimeError):
    """Neither the Hub nor the Hugging Face cache could provide the checkpoint; the message says why."""


def could_be_repo_id(ref: str) -> bool:
    """Whether ``ref`` could name a Hub repo, ``USER/NAME`` as the Hub spells them; if not, it can only be a local path
    (``./x``, ``/x``, ``~/x``, ``a/b/c``, a bare name...)."""
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return bool(REPO_ID.match(ref))


def hub_unreachable(ref: str, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """Why the Hub cannot be asked about ``ref`` now (offline mode, unreachable, a server error); ``None`` when it
    answers. One request, without the client's retries (a download retries a dead connection 5 times, about 30 s).
    A Hub that answers there is no such repository or revision raises that: a wrong name is not a reason to use a
    stale cache."""
    if constants.is_offline_mode():
        return "offline mode, HF_HUB_OFFLINE=1"
    try:
        HfApi(token=token).repo_info(ref, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable, timeout, server error
        return describe_hub_error(exc)
    return None


def describe_hub_error(exc: BaseException) -> str:
    """One line saying what went wrong talking to the Hub (never includes credentials)."""
    if isinstance(exc, HubUnavailable):
        return str(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode, HF_HUB_OFFLINE=1"
    if isinstance(exc, RepositoryNotFoundError):
        return "the repository does not exist, or is private and the token cannot read it"
    if isinstance(exc, RevisionNotFoundError):
        return "the repository has no such revision"
    if isinstance(exc, LocalEntryNotFoundError):
        return "it is not (completely) in the Hugging Face cache"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"HTTP {status} from {constants.ENDPOINT}: {exc.server_message or str(exc).strip().splitlines()[0]}"
    if _is_connection_error(exc):
        return f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(exc).__name__})"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


def _is_connection_error(exc: BaseException) -> bool:
    kinds: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import httpx2  # the HTTP client huggingface_hub 2 uses; absent with other versions, hence here and guarded

        kinds += (httpx2.TransportError,)
    except ImportError:
        pass
    return isinstance(exc, kinds)
