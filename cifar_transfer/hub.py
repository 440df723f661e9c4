"""Resolve a checkpoint reference: a local folder, or a Hugging Face Hub repo id.

Hub downloads go through the Hugging Face cache. Offline (``HF_HUB_OFFLINE=1``)
or with the Hub unreachable, the cache is used, then the embedded local copy,
and the returned note says which was used, and why.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checkpoint import CALIBRATION_NAME, CARD_NAME, CONFIG_NAME, METRICS_NAME, PRETRAINED_CFG_SOURCE, WEIGHTS_NAME, CheckpointError
from .model import CifarTransferModel, load_checkpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = [WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, CARD_NAME, CALIBRATION_NAME]  # those present


class HubUnavailable(RuntimeError):
    """Neither the Hub nor the Hugging Face cache could provide the checkpoint; the message says why."""


def resolve_checkpoint(ref: str, revision: str | None = None, fallback: str | Path | None = None
                       ) -> tuple[Path, CifarTransferModel, str]:
    """Return ``(folder, model, note)`` for a local folder or a Hub repo id: one of this package's checkpoints or
    any timm classifier's (the note then says its contract came from the repo's ``pretrained_cfg``)."""
    path = Path(ref).expanduser()
    if path.exists() or not could_be_repo_id(ref):
        return path, *_loaded(path, f"loaded local checkpoint {path}")
    label = ref + (f"@{revision}" if revision else "")
    try:
        folder, how = _from_hub(ref, revision)
        return folder, *_loaded(folder, f"{how}: {label} (commit {folder.name[:8]})")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - not found, no cache, incomplete cache: all end in the fallback
        reason = describe_hub_error(exc)
    if fallback is not None and Path(fallback).exists():
        folder = Path(fallback)
        return folder, *_loaded(folder, f"could not load {label} from the Hub or its cache ({reason}); using the local copy {folder}")
    raise CheckpointError(f"no such local folder: {ref} ({path.absolute()}), and cannot load {label} from the Hugging Face "
                          f"Hub or its cache: {reason}")


def could_be_repo_id(ref: str) -> bool:
    """Whether ``ref`` could name a Hub repo, ``USER/NAME`` as the Hub spells them; if not, it can only be a local path
    (``./x``, ``/x``, ``~/x``, ``a/b/c``, a bare name...)."""
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return bool(REPO_ID.match(ref))


def _loaded(folder: Path, note: str) -> tuple[CifarTransferModel, str]:
    """Load ``folder``; for another project's timm classifier the note names where its contract and labels came from."""
    model = load_checkpoint(folder)
    if model.contract_source == PRETRAINED_CFG_SOURCE:
        note += (f"; a timm {model.architecture} classifier, not a cifar-transfer checkpoint: {PRETRAINED_CFG_SOURCE}, "
                 f"{len(model.class_names)} labels from {model.labels_source}")
    return model, note


def _from_hub(ref: str, revision: str | None) -> tuple[Path, str]:
    """Download (online) or look up (offline, unreachable) the snapshot; say which."""
    from huggingface_hub import snapshot_download

    why = hub_unreachable(ref, revision)
    if why is None:
        folder = snapshot_download(ref, revision=revision, allow_patterns=CHECKPOINT_FILES)
        return Path(folder), "downloaded from the Hugging Face Hub"
    try:
        folder = snapshot_download(ref, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not cached, or cached only in part
        raise HubUnavailable(f"{why}, and {describe_hub_error(exc)}") from exc
    return Path(folder), f"loaded from the Hugging Face cache ({why})"


def hub_unreachable(ref: str, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """Why the Hub cannot be asked about ``ref`` now (offline mode, unreachable, a server error); ``None`` when it
    answers. One request, without the client's retries (a download retries a dead connection 5 times, about 30 s).
    A Hub that answers there is no such repository or revision raises that: a wrong name is not a reason to use a
    stale cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

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
    from huggingface_hub import constants
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

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
        import httpx2  # the HTTP client huggingface_hub 2 uses

        kinds += (httpx2.TransportError,)
    except ImportError:
        pass
    return isinstance(exc, kinds)
