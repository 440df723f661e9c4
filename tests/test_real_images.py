"""The real-image set's manifest and split (benchmarks/real_images.py) and the meter harness's arithmetic
(benchmarks/meter_on_real_images.py), with no image package installed: synthetic manifests and a fake predictor,
plus the committed manifest itself."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ri = _load("real_images")
harness = _load("meter_on_real_images")


def _digest(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


# -- the split ------------------------------------------------------------------------


def test_split_depends_on_the_image_alone_and_halves_many_images():
    digests = [_digest(i) for i in range(2000)]
    splits = [ri.split_of(d) for d in digests]
    assert splits == [ri.split_of(d) for d in reversed(digests)][::-1]  # order and company change nothing
    assert set(splits) == {ri.DESIGN, ri.HELDOUT}
    assert 0.45 <= splits.count(ri.HELDOUT) / len(splits) <= 0.55
    other_salt = [ri.split_of(d, salt="another") for d in digests]
    assert other_salt != splits  # the salt is what the rule hangs on


def test_split_counts_per_kind():
    images = [{"kind": k, "split": s} for k, s in (("photo", "design"), ("photo", "heldout"), ("photo", "heldout"),
                                                     ("nonphoto", "design"))]
    assert ri.split_counts(images) == {"photo": {"design": 1, "heldout": 2}, "nonphoto": {"design": 1, "heldout": 0}}


def test_committed_manifest_follows_its_rule():
    manifest = ri.load_manifest()
    images = manifest["images"]
    ids = [r["id"] for r in images]
    assert len(set(ids)) == len(ids)
    for r in images:
        assert r["split"] == ri.split_of(r["sha256"]), r["id"]
        assert r["file"] == r["id"] + Path(r["source"]["original_path"]).suffix.lower()
        assert r["kind"] in (ri.PHOTO, ri.NONPHOTO) and r["label"] and r["source"]["version"] and r["source"]["license"]
    assert manifest["counts"] == ri.split_counts(images)
    for kind, counts in manifest["counts"].items():
        assert 0.40 <= counts[ri.HELDOUT] / sum(counts.values()) <= 0.60, kind  # stratified: each kind near half
    assert sum(manifest["counts"][ri.PHOTO].values()) >= 100


# -- reading the manifest -----------------------------------------------------------------


def _one_line_error(call) -> str:
    with pytest.raises(ri.ManifestError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_manifest_is_one_line_naming_the_build(tmp_path):
    message = _one_line_error(lambda: ri.load_manifest(tmp_path / "manifest.json"))
    assert message.startswith(f"{tmp_path / 'manifest.json'} does not exist") and ri.BUILD_COMMAND in message


@pytest.mark.parametrize("text", ["{not json", json.dumps({"about": "no images"}), json.dumps([1, 2])])
def test_a_file_that_is_no_manifest_is_one_line(tmp_path, text):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    assert ri.BUILD_COMMAND in _one_line_error(lambda: ri.load_manifest(path))


def _manifest_with(tmp_path, files: dict[str, bytes], split: str = "design") -> dict:
    images = [{"id": Path(name).stem, "file": name, "kind": "photo", "split": split,
               "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"images": images}))
    return ri.load_manifest(path)


def test_select_gives_the_split_and_checks_every_file(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    manifest = _manifest_with(tmp_path, {"a.png": b"a", "b.png": b"b"})
    manifest["images"].append({**manifest["images"][0], "id": "c", "file": "c.png", "split": ri.HELDOUT})
    (root / "a.png").write_bytes(b"a")
    (root / "b.png").write_bytes(b"b")
    assert [f.name for _, f in ri.select(manifest, ri.DESIGN, root=root)] == ["a.png", "b.png"]
    assert ri.select(manifest, ri.DESIGN, kind="nonphoto", root=root) == []
    assert "c.png is missing" in _one_line_error(lambda: ri.select(manifest, ri.HELDOUT, root=root))
    (root / "b.png").write_bytes(b"changed")
    assert "sha256 differs" in _one_line_error(lambda: ri.select(manifest, ri.DESIGN, root=root))
    assert "unknown split" in _one_line_error(lambda: ri.select(manifest, "test", root=root))


# -- licences and install commands ---------------------------------------------------------------

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: backgrounds

Files: *
Copyright: someone
License: GPL-2+

Files: nature/Aqua.jpg
       nature/Garden.jpg
License: CC-BY-SA-4.0

Files: debian/*
License: GPL-2+
"""


def test_dep5_licence_is_the_last_fitting_stanza():
    assert ri.dep5_license(COPYRIGHT, "/usr/share/backgrounds/mate/nature/Garden.jpg").startswith("CC-BY-SA-4.0")
    assert ri.dep5_license(COPYRIGHT, "/usr/share/backgrounds/Garden.jpg").startswith("CC-BY-SA-4.0")  # by file name
    assert ri.dep5_license(COPYRIGHT, "/usr/share/backgrounds/mate/nature/Storm.jpg").startswith("GPL-2+ (")
    assert ri.dep5_license("This package was debianized by", "/x.jpg") is None


def test_install_commands_name_exactly_what_is_missing():
    assert ri.install_commands(["mate-backgrounds", "opencv-doc"], ["scikit-image"]) == [
        "apt-get install -y --no-install-recommends mate-backgrounds opencv-doc",
        ".venv/bin/python -m pip install --no-deps --target data/real_images/pypi scikit-image==" + ri.PYPI_PACKAGES["scikit-image"]]
    assert ri.install_commands([], ["matplotlib"]) == [".venv/bin/python -m pip install -r requirements.txt"]
    assert ri.install_commands([], []) == []


def test_catalogue_ids_are_unique_and_name_their_kind():
    ids = [ri.image_id(e) for e in ri.CATALOGUE]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(e.kind + "-") for i, e in zip(ids, ri.CATALOGUE))


# -- the measurement's arithmetic, through what a predictor returns ------------------------------------------


class FakePrediction:
    def __init__(self, panels):
        self.panels = panels

    def to_dict(self):
        return {"variants": [{"key": k, "label": label, "meter": {"level": level, "divergence": 1.0}}
                             for k, (level, label) in self.panels.items()]}


class FakePredictor:
    """Answers each image with the levels and labels given for its name, as Predictor.predict's result does."""

    accuracy = {"correct": 0.9, **{k: 0.8 for k in harness.WRONG_VARIANTS}}

    def __init__(self, answers):
        self.answers = answers

    def predict(self, image, variants):
        assert list(variants) == list(harness.WRONG_VARIANTS)  # every variant, every time
        return FakePrediction(self.answers[Path(image).name])


def _answer(correct_level, bgr_level, bgr_label="cat", other="drifting", correct_label="cat"):
    panels = {"correct": (correct_level, correct_label)}
    panels.update({k: (other, "dog") for k in harness.WRONG_VARIANTS})
    panels["bgr"] = (bgr_level, bgr_label)
    return panels


def test_measure_counts_flags_and_agreement_per_variant():
    answers = {"a.png": _answer("ok", "ok"), "b.png": _answer("drifting", "broken", "dog"),
               "c.png": _answer("unusual", "drifting"), "d.png": _answer("broken", "ok", other="ok", correct_label="dog")}
    result = harness.measure(FakePredictor(answers), ["x/a.png", "x/b.png", "x/c.png", "x/d.png"])
    s = result["summary"]
    assert s["images"] == 4
    assert s["correct"] == {"flagged": 0.5, "levels": {"broken": 1, "drifting": 1, "ok": 1, "unusual": 1}}
    assert s["variants"]["bgr"]["flagged"] == 0.5 and s["variants"]["bgr"]["top1_agrees_with_correct"] == 0.5
    assert s["variants"]["raw_0_255"]["flagged"] == 0.75 and s["variants"]["raw_0_255"]["top1_agrees_with_correct"] == 0.25
    assert s["variants"]["bgr"]["accuracy_cost_points"] == 10.0
    assert [r["image"] for r in result["images"]] == ["a.png", "b.png", "c.png", "d.png"]
    assert result["images"][2]["panels"]["correct"]["level"] == "unusual"


def test_groups_split_kinds_and_drop_grayscale_from_colour_only():
    entries = [{"kind": "photo", "grayscale": False}, {"kind": "nonphoto", "grayscale": True},
               {"kind": "photo", "grayscale": True}]
    assert harness.groups(entries) == {"photo": [0, 2], "photo, colour only": [0],
                                       "nonphoto": [1], "nonphoto, colour only": []}
