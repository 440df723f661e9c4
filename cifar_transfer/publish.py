"""Publish a checkpoint folder to the Hugging Face Hub, in one commit.

    python -m cifar_transfer.publish checkpoints/efficientnet_lite0-cifar10 --repo-id USER/NAME \\
        [--private] [--revision BRANCH] [--commit-message MSG]

The token comes from ``HF_TOKEN`` or a prior ``hf auth login``; it is never
printed, logged or written anywhere. The folder is validated first; then the
repo is created if needed and the weights, config.json, metrics.json and a
model card generated for the repo are uploaded in a single commit (nothing
else: no ``train_state.pt``). A failed upload leaves nothing half-published: a
commit is atomic on the Hub, and a repo this call created is deleted again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from .card import render_model_card
from .hub_refs import REPO_ID, describe_hub_error
from .checkpoint import CALIBRATION_NAME, CARD_NAME, CONFIG_NAME, METRICS_NAME, WEIGHTS_NAME, CheckpointError, read_config, read_metrics

UPLOADED = (WEIGHTS_NAME, CONFIG_NAME, METRICS_NAME, CALIBRATION_NAME)  # those present; plus the card, rendered for the repo
KEEP_IF_PRESENT = {".gitattributes", CARD_NAME}  # files an empty Hub repo may already hold


class PublishError(RuntimeError):
    """Publishing failed or was refused; the message says why and what to do. Nothing was published."""


def publish(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a checkpoint folder to ``repo_id`` in one commit; return the repo's URL."""
    return publish_checkpoint(checkpoint, repo_id, private=private, revision=revision,
                              commit_message=commit_message, token=token)["url"]


def publish_checkpoint(checkpoint: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                       commit_message: str | None = None, token: str | None = None) -> dict:
    """As :func:`publish`; returns ``{"url", "commit_url", "commit", "files", "created"}``."""
    folder = Path(checkpoint)
    try:
        config, metrics = read_config(folder), read_metrics(folder)
    except CheckpointError as exc:
        raise PublishError(f"not publishing: {exc}") from exc
    if not REPO_ID.match(repo_id or ""):
        raise PublishError(f"--repo-id must look like USER/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}")
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens) or run `hf auth login`; nothing was uploaded")
    api = HfApi(token=token)
    operations = [CommitOperationAdd(name, str(folder / name)) for name in UPLOADED if (folder / name).is_file()]
    operations.append(CommitOperationAdd(CARD_NAME, render_model_card(config, metrics, repo_id).encode()))
    message = commit_message or _default_message(config, metrics)

    created = _create_repo(api, repo_id, private, revision, token)
    try:
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except Exception as exc:  # noqa: BLE001 - whatever failed, undo and explain
        undone = _delete_new_repo(api, repo_id) if created else False
        raise PublishError(_scrub(
            f"uploading to {repo_id} failed, nothing was published"
            + (" (the repo created for it was deleted again)" if undone else "")
            + (f" (the repo created for it is still there, empty: delete it at {api.endpoint}/{repo_id}/settings)"
               if created and not undone else "")
            + f": {describe_hub_error(exc)}", token)) from exc
    url = f"{api.endpoint}/{repo_id}" + (f"/tree/{revision}" if revision not in (None, "main") else "")
    return {"url": url, "commit_url": info.commit_url, "commit": info.oid, "created": created,
            "files": [op.path_in_repo for op in operations]}


def _create_repo(api, repo_id: str, private: bool, revision: str | None, token: str) -> bool:
    """Create the repo; True if it is new. An existing repo is reused only if it holds a cifar-transfer checkpoint."""
    namespace = repo_id.split("/")[0]
    try:
        api.create_repo(repo_id, private=private)
        return True
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 409:
            _check_existing(api, repo_id, revision, token)
            return False
        if status == 401:
            raise PublishError("the Hugging Face Hub rejected the token (HTTP 401): set HF_TOKEN to a valid token "
                               "with write access or run `hf auth login` again; nothing was uploaded") from exc
        if status == 403:
            raise PublishError(_scrub(
                f"cannot publish to {repo_id}: the token may not create or write repos under '{namespace}' "
                f"(HTTP 403: {exc.server_message or 'forbidden'}). The name may belong to someone else; choose a "
                "repo id under your own user name or an organization you can write to. Nothing was uploaded", token)) from exc
        raise PublishError(_scrub(f"cannot create {repo_id}: {describe_hub_error(exc)}; nothing was uploaded", token)) from exc
    except Exception as exc:  # noqa: BLE001 - unreachable, offline, timeout
        raise PublishError(_scrub(f"cannot create {repo_id}: {describe_hub_error(exc)}; nothing was uploaded", token)) from exc


def _check_existing(api, repo_id: str, revision: str | None, token: str) -> None:
    """Refuse to commit into an existing repo that holds something other than a cifar-transfer checkpoint."""
    try:
        try:
            rev = revision
            files = set(api.list_repo_files(repo_id, revision=rev))
        except RevisionNotFoundError:  # a new branch starts from main
            rev = None
            files = set(api.list_repo_files(repo_id))
        fmt = None
        if CONFIG_NAME in files:
            with tempfile.TemporaryDirectory() as tmp:
                path = api.hf_hub_download(repo_id, CONFIG_NAME, revision=rev, cache_dir=tmp)
                fmt = json.loads(Path(path).read_text(encoding="utf-8")).get("format")
    except Exception as exc:  # noqa: BLE001
        raise PublishError(_scrub(f"{repo_id} already exists and cannot be inspected: {describe_hub_error(exc)}; "
                                  "nothing was uploaded", token)) from exc
    if not str(fmt).startswith("cifar_transfer/") and files - KEEP_IF_PRESENT:  # any version of ours may be replaced
        raise PublishError(f"the name {repo_id} is taken: the repo exists and does not hold a cifar-transfer checkpoint "
                           f"(its files: {', '.join(sorted(files))}). Choose another name; nothing was uploaded")


def _delete_new_repo(api, repo_id: str) -> bool:
    try:
        api.delete_repo(repo_id)
        return True
    except Exception:  # noqa: BLE001 - reported in the error message instead
        return False


def _default_message(config: dict, metrics: dict | None) -> str:
    acc = ((metrics or {}).get("accuracy") or {}).get("correct")
    return f"Upload {config['architecture']} checkpoint" + (f" (test accuracy {100 * acc:.2f}%)" if acc is not None else "")


def _scrub(text: str, token: str) -> str:
    """Belt and braces: a token must never reach a message, whatever a server echoes back."""
    return text.replace(token, "hf_***") if token else text


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.publish", description=__doc__.split("\n\n")[0],
                                epilog="Token: HF_TOKEN or `hf auth login`. Endpoint: HF_ENDPOINT (default https://huggingface.co).")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors, config.json, metrics.json)")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="model repo to create or update")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing); default: main")
    p.add_argument("--commit-message", metavar="MSG", help="default: 'Upload <architecture> checkpoint (test accuracy ...)'")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        result = publish_checkpoint(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                                    commit_message=args.commit_message)
    except PublishError as exc:
        raise SystemExit(f"error: {exc}") from None
    verb = "created and published" if result["created"] else "published"
    print(f"{verb} {args.checkpoint} -> {result['url']} ({', '.join(result['files'])}) in commit {result['commit'][:8]}")


if __name__ == "__main__":
    main()
