"""Resolve a checkpoint reference: a local folder, or a Hugging Face Hub repo id.

Hub downloads go through the Hugging Face cache. Offline (``HF_HUB_OFFLINE=1``)
or with the Hub unreachable, the cache is used, then the embedded local copy,
and the returned note says which was used, and why.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from .checkpoint import CALIBRATION_NAME, CARD_NAME, CONFIG_NAME, METRICS_NAME, PRETRAINED_CFG_SOURCE, WEIGHTS_NAME, CheckpointError
from .hub_refs import HubUnavailable, could_be_repo_id, describe_hub_error, hub_unreachable
from .model import CifarTransferModel, load_checkpoint

CHECKPOINT_FILES = [WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, CARD_NAME, CALIBRATION_NAME]  # those present


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


def _loaded(folder: Path, note: str) -> tuple[CifarTransferModel, str]:
    """Load ``folder``; for another project's timm classifier the note names where its contract and labels came from."""
    model = load_checkpoint(folder)
    if model.contract_source == PRETRAINED_CFG_SOURCE:
        note += (f"; a timm {model.architecture} classifier, not a cifar-transfer checkpoint: {PRETRAINED_CFG_SOURCE}, "
                 f"{len(model.class_names)} labels from {model.labels_source}")
    return model, note


def _from_hub(ref: str, revision: str | None) -> tuple[Path, str]:
    """Download (online) or look up (offline, unreachable) the snapshot; say which."""
    why = hub_unreachable(ref, revision)
    if why is None:
        folder = snapshot_download(ref, revision=revision, allow_patterns=CHECKPOINT_FILES)
        return Path(folder), "downloaded from the Hugging Face Hub"
    try:
        folder = snapshot_download(ref, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - not cached, or cached only in part
        raise HubUnavailable(f"{why}, and {describe_hub_error(exc)}") from exc
    return Path(folder), f"loaded from the Hugging Face cache ({why})"
