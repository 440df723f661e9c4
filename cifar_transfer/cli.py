"""What every command line of the package shares: a help formatter whose defaults read right.

argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: ...)`` to every option, which
reads backwards on flags (``--no-download ... (default: True)``), says nothing on ``None``, doubles
help that already names its default, and prints absolute paths of the machine that ran it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where X tells the reader something; paths under the repository relative."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # store_true / store_false / store_const / BooleanOptionalAction (adds its own)
        if flag or action.default in (None, argparse.SUPPRESS, [], "") or "default" in text.lower():
            return text
        return f"{text} (default: {shown(action.default)})"


def shown(value) -> str:
    """A default as help prints it: a path under the repository relative to it, '%' escaped."""
    text = str(value)
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(text):
        path = Path(text)
        text = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else text
    return text.replace("%", "%%")
