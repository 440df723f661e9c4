"""Resolve a checkpoint reference: a local folder, or a Hugging Face Hub repo id.

Hub downloads go through the Hugging Face cache. Offline (``HF_HUB_OFFLINE=1``)
or with the Hub unreachable, the cache is used, then the embedded local copy,
and the returned note says which was used.
"""

from __future__ import annotations

import re
from pathlib import Path

from .model import CheckpointError, CifarTransferModel, load_checkpoint

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CHECKPOINT_FILES = ["model.safetensors", "config.json", "metrics.json", "README.md"]


def resolve_checkpoint(ref: str, revision: str | None = None, fallback: str | Path | None = None
                       ) -> tuple[Path, CifarTransferModel, str]:
    """Return ``(folder, model, note)`` for a local folder or a Hub repo id."""
    path = Path(ref).expanduser()
    if path.exists() or not REPO_ID.match(ref):
        return path, load_checkpoint(path), f"loaded local checkpoint {path}"
    from huggingface_hub import snapshot_download

    errors = []
    for local_only, how in ((False, "downloaded from the Hugging Face Hub"), (True, "loaded from the Hugging Face cache")):
        try:
            folder = Path(snapshot_download(ref, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=local_only))
            return folder, load_checkpoint(folder), f"{how}: {ref}" + (f"@{revision}" if revision else "")
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline, unreachable, not found, no cache
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    if fallback is not None and Path(fallback).exists():
        folder = Path(fallback)
        return folder, load_checkpoint(folder), f"the Hub was not usable for {ref} ({errors[0]}); using the local copy {folder}"
    raise CheckpointError(f"cannot load {ref!r} from the Hugging Face Hub or its cache: {'; '.join(errors)}")
