"""The README's Python snippets run as written (issue 13), and the README is a front page (issue 22).

Each ```python block of README.md and docs/*.md is run in a fresh interpreter: from the repository root, as the
README says, and (for the snippets that name repository files) from another folder with those paths made absolute,
so an installed package (``pip install -e .``) is what they import. The API snippet gets the test app's URL.
Every relative link of those pages points at a file of the repository (and a heading, where it names one), and
the README stays short enough to read as a front page.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the front page and the pages it links to
SNIPPETS = [s for page in PAGES for s in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)]
README_MAX_LINES = 260  # issue 22: a front page of about 250 lines; the rest lives in docs/


def run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def snippet(marker: str) -> str:
    found = [s for s in SNIPPETS if marker in s]
    assert len(found) == 1, f"README.md and docs/ have {len(found)} Python snippets with {marker!r}"
    return found[0]


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_the_classify_snippet_runs_and_prints_the_classes(where, tmp_path):
    code = snippet("model.classify(pixels)")
    if where == "elsewhere":
        code = code.replace('"checkpoints/', f'"{REPO}/checkpoints/').replace('"examples/', f'"{REPO}/examples/')
    out = run(code, REPO if where == "repository root" else tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    correct, bgr = out.stdout.split()
    assert correct == "cat"  # what the README's comment promises
    assert bgr in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_the_api_snippet_runs_against_the_app(running_app):
    code = snippet('api_name="/predict"').replace('"http://127.0.0.1:7860/"', repr(running_app))
    out = run(code, REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if not line.startswith("Loaded as API")]
    assert [line.split()[0] for line in lines] == ["correct", "no_normalization", "raw_0_255", "bgr"]
    assert lines[0].split()[1] == "cat"


def slug(heading: str) -> str:
    """The anchor GitHub and the Hugging Face Hub give a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(page) -> list[str]:
    """Targets of the page's markdown links and images, outside code blocks and code spans, that are not URLs."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`]*`", "", text)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z][a-z+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    assert links or page.name != "README.md", "the front page links into docs/"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(REPO) and target.exists(), f"{page.name}: {link} points at no file"
        if anchor:
            assert target.suffix == ".md" and anchor in anchors(target), f"{page.name}: {link} names no heading"


def test_the_readme_is_a_front_page_linking_every_docs_page():
    readme = PAGES[0].read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {(REPO / link.partition("#")[0]).resolve() for link in relative_links(PAGES[0])}
    assert set(PAGES[1:]) <= linked, "a docs/ page the front page does not link to"
