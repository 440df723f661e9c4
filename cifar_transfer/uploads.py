"""Files a visitor sends: which paths the app may open, and a bound on the disk they use.

Gradio hands an image input to the app as a path. A caller of the HTTP API can
name *any* path there (a ``FileData`` without Gradio's ``meta`` tag skips its
"was this uploaded?" check), so the app decides for itself: :class:`UploadGuard`
admits only regular files that, with symlinks and ``..`` resolved, lie inside
Gradio's upload/cache folder or the shipped examples. Everything else gets one
message, :data:`REFUSED`, whatever the path is (missing, a directory, not an
image, any size): the refusal tells a caller nothing about the server's files.

:class:`UploadJanitor` bounds the upload folder's disk use on a server that
runs for weeks. Gradio streams each upload into a ``tmp*`` file at the top of
that folder and leaves it there for ever when the client breaks the upload
off; finished uploads stay until the server restarts. The janitor removes
stalled partial uploads after ``partial_age`` seconds, finished uploads after
``upload_age`` seconds, and, past ``max_bytes``, the oldest files first.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

REFUSED = "This app only reads images uploaded to it, pasted into it, or its own examples."

# Defaults for a public Space: a partial upload that has not grown for 10 minutes is
# abandoned (Gradio's own uploads finish in seconds at 25 MB); a visitor's finished
# upload is kept 6 hours (deep links to a result reopen its image); 1 GiB at most.
PARTIAL_AGE_S = 10 * 60
UPLOAD_AGE_S = 6 * 3600
MAX_BYTES = 1024**3
SWEEP_EVERY_S = 60


def upload_folder() -> Path:
    """Gradio's upload/cache folder (``$GRADIO_TEMP_DIR`` or ``<tmp>/gradio``), resolved."""
    from gradio.utils import get_upload_folder  # gradio takes ~2.2 s to import: the guard and janitor do not need it

    return Path(get_upload_folder()).resolve()


class UploadGuard:
    """Admits only files inside ``roots`` (resolved); see the module doc."""

    def __init__(self, roots: list[str | Path]):
        self.roots = [Path(r).resolve() for r in roots]

    def check(self, path: str | os.PathLike) -> Path:
        """The resolved path of an admitted regular file, else ``PermissionError(REFUSED)``."""
        try:
            resolved = Path(os.fspath(path)).resolve(strict=True)
            admitted = any(resolved.is_relative_to(root) for root in self.roots)
            if admitted and stat.S_ISREG(resolved.stat().st_mode):
                return resolved
        except (OSError, ValueError, TypeError, RuntimeError):  # missing, a loop, a NUL byte, not a path
            pass
        raise PermissionError(REFUSED)


class UploadJanitor:
    """Deletes abandoned and old files under Gradio's upload folder, from a daemon thread."""

    def __init__(self, folder: str | Path, keep=lambda: (), partial_age: float = PARTIAL_AGE_S,
                 upload_age: float = UPLOAD_AGE_S, max_bytes: int = MAX_BYTES, every: float = SWEEP_EVERY_S):
        self.folder = Path(folder)
        self.keep = keep  # () -> paths never to delete (Gradio's cached copies of the examples)
        self.partial_age, self.upload_age, self.max_bytes, self.every = partial_age, upload_age, max_bytes, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """One pass; returns counts and bytes removed and kept (for logs and tests)."""
        now = time.time() if now is None else now
        keep = {Path(k).resolve() for k in self.keep()}
        files = []  # (mtime, size, path, is_partial)
        for path in self.folder.rglob("*") if self.folder.is_dir() else ():
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                continue
            if path.resolve() in keep:
                continue
            partial = path.parent == self.folder and path.name.startswith("tmp")
            files.append((st.st_mtime, st.st_size, path, partial))
        removed = removed_bytes = 0
        survivors = []
        for mtime, size, path, partial in files:
            if now - mtime > (self.partial_age if partial else self.upload_age):
                removed, removed_bytes = removed + self._unlink(path), removed_bytes + size
            else:
                survivors.append((mtime, size, path, partial))
        total = sum(size for _, size, _, _ in survivors)
        for mtime, size, path, _ in sorted(survivors, key=lambda f: f[0]):  # oldest first
            if total <= self.max_bytes:
                break
            removed, removed_bytes, total = removed + self._unlink(path), removed_bytes + size, total - size
        self._remove_empty_dirs()
        return {"removed": removed, "removed_bytes": removed_bytes, "kept_bytes": max(total, 0)}

    @staticmethod
    def _unlink(path: Path) -> int:
        try:
            path.unlink()
            return 1
        except OSError:
            return 0

    def _remove_empty_dirs(self) -> None:
        for d in sorted((p for p in self.folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                pass

    def start(self) -> "UploadJanitor":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="upload-janitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                counts = self.sweep()
                if counts["removed"]:
                    log.info("upload janitor: removed %(removed)d files (%(removed_bytes)d bytes); "
                             "%(kept_bytes)d bytes kept", counts)
            except Exception:  # noqa: BLE001 - a sweep must never take the server down
                log.exception("upload janitor: sweep failed")
