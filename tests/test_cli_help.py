"""Every command's --help reads right: defaults only where they tell something, never backwards or doubled."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cifar_transfer import train as train_mod
from cifar_transfer.backbones import BACKBONES

from .conftest import REPO

COMMANDS = [["-m", "cifar_transfer.train"], ["-m", "cifar_transfer.evaluate"], ["-m", "cifar_transfer.doctor"],
            ["-m", "cifar_transfer.experiment"], ["-m", "cifar_transfer.study"], ["-m", "cifar_transfer.meter"],
            [str(REPO / "app.py")]]


def options(help_text: str) -> dict[str, str]:
    """Each option's help paragraph, keyed by its first flag."""
    found, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            found[current] = line
        elif current and line.startswith("    "):
            found[current] += " " + line.strip()
        else:
            current = None
    return found


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1].rsplit("/", 1)[-1])
def test_help_shows_meaningful_defaults_only(command):
    out = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "(default: None)" not in text
    assert str(REPO) not in text, "an absolute path of this machine as a default"
    for flag, paragraph in options(text).items():
        assert paragraph.lower().count("default") <= 1, f"{flag}: default said twice: {paragraph}"
        if flag.startswith("--no-"):  # a flag that turns something off has no default to show
            assert "(default: True)" not in paragraph and "(default: False)" not in paragraph, f"{flag}: {paragraph}"


def test_the_formatter_keeps_real_defaults_and_drops_the_rest():
    import argparse

    from cifar_transfer.cli import HelpFormatter

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download")
    p.add_argument("--epochs", type=int, default=6, help="epochs (default: per backbone)")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "x"), help="output folder")
    help_text = options(p.format_help())
    assert help_text["--lr"].endswith("peak learning rate (default: 0.05)")
    assert help_text["--seed"].endswith("random seed")
    assert help_text["--no-download"].endswith("never download")
    assert help_text["--epochs"].endswith("epochs (default: per backbone)")
    assert help_text["--out"].endswith("output folder (default: checkpoints/x)")


def test_train_help_shows_each_backbones_defaults():
    """The settings each backbone defaults differently show every backbone's value (from the registry), not just
    "default per backbone"."""
    help_text = " ".join(train_mod.get_args_parser().format_help().split())
    for flag, key in (("--input-size", "input_size"), ("--freeze-stages", "freeze_stages"), ("--epochs", "epochs"),
                      ("--batch-size", "batch_size"), ("--optimizer", "optimizer"), ("--lr", "lr")):
        paragraph = help_text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        said = paragraph.split("default per backbone: ", 1)[-1].split("default: ", 1)[-1]
        shown = {}
        for part in said.split("; "):
            value, names = part.split(" for ", 1)
            for name in names.split(", "):
                shown[name.strip()] = value
        expected = {name: str(spec.defaults[key]) for name, spec in BACKBONES.items()}
        if set(shown) == {"every backbone"}:
            assert set(expected.values()) == {shown["every backbone"]}, (flag, paragraph)
        else:
            assert shown == expected, (flag, paragraph)
