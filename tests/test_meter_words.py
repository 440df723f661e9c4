"""The meter's words agree with its numbers, and the level a reading gets is the one its numbers call for (issue 20).

Every reading the meter makes (the absolute one for single images and batches, the app's correct panel, the app's
other panels read against it) is generated at and around each of its thresholds, over every branch of its text.
The expected level is worked out here from the shipped calibration's stored thresholds and held-out scores, not
asked of the meter, so a threshold scaled where a reading is made turns these red. Every "(name value, relation
threshold)" the words state must hold for the shown numbers and for the reading's own; every claim about a sign
("fits better with red and blue exchanged", "fits at least as well") must match the sign of the number it is about.
"""

from __future__ import annotations

import itertools
import re
import statistics
from pathlib import Path

import pytest

from cifar_transfer import meter

from .conftest import APP_CHECKPOINT

NUMBER = r"-?[\d,]+(?:\.\d+)?"
#: "(shift 5.40, above 2.68": a named number and the threshold the words compare it with
CLAIM = re.compile(rf"\((score|shift|channel score|channel shift) ({NUMBER}), (above|below|beyond|at most|not below) "
                   rf"({NUMBER})")
HOLDS = {"above": lambda v, t: v > t, "beyond": lambda v, t: v > t, "below": lambda v, t: v < t,
         "at most": lambda v, t: v <= t, "not below": lambda v, t: v >= t}
#: phrases that claim a sign, and the sign they claim for the next named number after them
SIGNS = {"better with red and blue exchanged": lambda v: v < 0, "less clearly": lambda v: v >= 0,
         "at least as well as": lambda v: v >= 0, "worse than": lambda v: v < 0, "better than": lambda v: v > 0,
         "changed the way exchanging red and blue changes them": lambda v: v < 0,
         "moved towards no normalization mistake": lambda v: v <= 0, "moved towards a normalization mistake": lambda v: v > 0}
#: how each level's words begin
OPENINGS = {"ok": ("Inside the contract as far as the meter can tell", "The reference: "),
            "drifting": ("Outside the contract", "Channel order looks swapped"), "broken": ("Far outside the contract",),
            "unusual": ("An unusual picture for this model",)}


@pytest.fixture(scope="module")
def cal():
    return meter.MeterCalibration.load(APP_CHECKPOINT / meter.CALIBRATION_FILE)


def around(*points: float) -> list[float]:
    """Each point, just below and just above it (closer than the words' two decimals), and a step either side."""
    return sorted({p + d for p in points for d in (-0.05, -1e-4, 0.0, 1e-4, 0.05)})


def number(text: str) -> float:
    return float(text.replace(",", ""))


def check_words(r: meter.MeterReading, values: dict[str, float | None]) -> None:
    """``r``'s words against its numbers: ``values`` maps each name the words may use to the number it stands for."""
    assert r.words.startswith(OPENINGS[r.level]), (r.level, r.words)
    assert r.colour == meter.COLOURS[r.level]
    claims = CLAIM.findall(r.words)
    for name, shown, relation, threshold in claims:
        actual = values[name]
        assert actual is not None, (name, r.words)
        places = len(shown.split(".")[1]) if "." in shown else 0
        assert number(shown) == pytest.approx(actual, abs=0.51 * 10 ** -places), (name, shown, actual)
        assert HOLDS[relation](number(shown), number(threshold)), (shown, relation, threshold, r.words)
    for phrase, sign in SIGNS.items():
        for found in re.finditer(re.escape(phrase), r.words):
            after = CLAIM.search(r.words, found.end())
            assert after, (phrase, r.words)
            assert sign(number(after.group(2))) and sign(values[after.group(1)]), (phrase, after.group(0), r.words)


def single(cal, n: int) -> dict:
    """The stored thresholds a batch statistic of ``n`` images is compared with, read from the file's fields."""
    t = dict(cal.thresholds)
    if n > 1:
        t.update(cal.thresholds["batch"][str(max(int(k) for k in cal.thresholds["batch"] if int(k) <= n))])
    return t


@pytest.mark.parametrize("n", [1, 2, 8, 32])
def test_absolute_reading_words_and_levels_at_every_threshold(cal, n):
    t = single(cal, n)
    scores = around(0.0, t["drifting"], t["broken"])
    channels = [None, *around(t["channel"], 0.0), 3.0, -3.0]
    levels = set()
    for score, channel in itertools.product(scores, channels):
        r = cal.reading(score, channel, n_images=n)
        expected = ("broken" if score > t["broken"] else "drifting" if score > t["drifting"]
                    else "drifting" if channel is not None and channel < t["channel"] else "ok")
        assert r.level == expected, (score, channel, r.level, r.words)
        assert r.divergence == score and r.channel_order == channel
        check_words(r, {"score": score, "channel score": channel})
        if r.level == "drifting" and r.words.startswith("Outside"):
            assert "pictures unlike the training images" in r.words  # says what it measured, not only "wrong"
        levels.add(r.level)
    assert levels == {"ok", "drifting", "broken"}


def test_the_correct_panel_is_never_called_wrong(cal):
    t = cal.thresholds
    branches = set()
    for score, channel in itertools.product(around(0.0, t["drifting"], t["broken"], 10 * t["broken"]),
                                            [None, *around(t["channel"], 0.0), 3.0, -3.0]):
        r = cal.reference_reading(score, channel)
        unusual = score > t["drifting"] or (channel is not None and channel < t["channel"])
        assert r.level == ("unusual" if unusual else "ok"), (score, channel, r.words)
        assert r.divergence == score and r.channel_order == channel and r.shift is None
        check_words(r, {"score": score, "channel score": channel})
        assert not re.search(r"Outside|looks swapped|wrong|mistake|broken|drifting", r.words), r.words
        if unusual:
            assert "not its preprocessing" in r.words and "compares the other panels with this one" in r.words
        branches.add((r.level, score > t["drifting"], score > t["broken"], channel is not None and channel < t["channel"]))
    assert len(branches) == 6  # ok; unusual by score, far score, channel, and score or far score with channel


def paired_thresholds_from_the_file(cal) -> dict:
    """The paired thresholds as the derivation states them, from the stored thresholds and held-out scores."""
    typical = statistics.median(max(row) for row in cal.held_out_scores["per_mistake"])
    t = cal.thresholds
    return {"drifting": t["drifting"] - typical, "broken": t["broken"] - typical, "channel": min(t["channel"], 0.0)}


def test_paired_thresholds_follow_their_derivation(cal):
    mine, theirs = paired_thresholds_from_the_file(cal), cal.paired_thresholds()
    for key in ("drifting", "broken", "channel"):
        assert theirs[key] == pytest.approx(mine[key], abs=1e-4), key
    assert 0 < theirs["drifting"] < cal.thresholds["drifting"] and theirs["channel"] <= 0


def test_other_panels_read_against_the_correct_one_words_and_levels(cal):
    t = paired_thresholds_from_the_file(cal)
    t_channel = cal.thresholds["channel"]
    shifts = around(0.0, t["drifting"], t["broken"])
    channel_shifts = [None, *around(t["channel"], 0.0), 3.0, -3.0]
    references = [None, *around(t_channel), 2.0]
    branches = set()
    for shift, cs, rc in itertools.product(shifts, channel_shifts, references):
        r = cal.paired_reading(1.0, shift, cs, rc)
        judged = cs is not None and rc is not None and rc >= t_channel
        expected = ("broken" if shift > t["broken"] else "drifting" if shift > t["drifting"]
                    else "drifting" if judged and cs < t["channel"] else "ok")
        assert r.level == expected, (shift, cs, rc, r.level, r.words)
        assert r.shift == shift and r.channel_shift == cs and r.channel_order is None
        # the channel clause names the reference's channel score only where it says why channel order went unjudged
        check_words(r, {"shift": shift, "channel shift": cs, "channel score": rc})
        assert "against the correct panel of this same picture" in r.words
        if r.level == "ok" and not judged:
            assert "channel order was not judged" in r.words
        branches.add((r.level, r.words.split(":")[0], judged, "not judged" in r.words and rc is not None))
    assert {b[0] for b in branches} == {"ok", "drifting", "broken"}
    assert ("drifting", "Channel order looks swapped", True, False) in branches
    assert ("ok", "Inside the contract as far as the meter can tell", False, True) in branches


def test_every_level_has_a_chip_in_the_app_with_aa_contrast():
    """app.py styles a chip per level (axe-core checks the page; this checks each level has one, dark enough)."""
    css = (Path(__file__).resolve().parents[1] / "app.py").read_text()

    def luminance(hex_colour: str) -> float:
        rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for level in meter.LEVELS:
        m = re.search(rf"\.meter-chip\.level-{level} \{{ background: (#[0-9a-f]{{6}}); color: (#[0-9a-f]{{3,6}}); \}}", css)
        assert m, level
        fg = m.group(2) if len(m.group(2)) == 7 else "#" + "".join(c * 2 for c in m.group(2)[1:])
        hi, lo = sorted((luminance(m.group(1)), luminance(fg)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, level
