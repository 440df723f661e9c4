"""Real photographs and non-photographic images, not CIFAR-10, to design and measure the contract meter on (issue 20).

    python benchmarks/real_images.py            # copy the catalogue's images, write the manifest
    python benchmarks/real_images.py --check    # only say what is missing, with the install commands

Every image comes from a package installed from Debian or PyPI (desktop wallpapers, sample images shipped
inside libraries, documentation photographs and screenshots); nothing is downloaded by this script and nothing
is installed by it: a missing package is named with the exact command that installs it, and no manifest is
written until every source is there. The images are copied byte for byte (what a visitor would upload) into
``data/real_images/images/`` (git-ignored; no image is committed) as ``<id><original extension>``; the manifest,
``results/real_images/manifest.json``, is committed: per image its id, kind (``photo`` / ``nonphoto``), a coarse
content label chosen by hand, the package and version, the original path, sha256, size, pixel size, whether it
is grayscale, the licence note found in the package, and its split.

The split is ``design`` or ``heldout`` from the image's own sha256 (:func:`split_of`): an image keeps its split
whatever else the catalogue holds, so adding images later never moves a held-out image into design. The salt was
fixed before anything was measured; its first version already put each kind between 45 and 55% held out (the
manifest's ``counts``). The held-out part is never used to design or calibrate the meter, only for the final measurement
(``benchmarks/meter_on_real_images.py --split heldout``).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import io
import json
import posixpath
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cifar_transfer.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402

DATA = REPO / "data/real_images"  # git-ignored
IMAGES = DATA / "images"
PYPI_TARGET = DATA / "pypi"  # the PyPI packages that only ship images for us, installed apart from the project's env
MANIFEST = REPO / "results/real_images/manifest.json"
BUILD_COMMAND = "python benchmarks/real_images.py"

PHOTO, NONPHOTO = "photo", "nonphoto"
DESIGN, HELDOUT = "design", "heldout"
SPLIT_SALT = "real-images-split-v1"  # see the module docstring; changing it reshuffles every image
GRAY_SPREAD = 3  # largest channel difference (0-255) at which a picture still counts as grayscale (JPEG noise)
GRAY_SIDE = 256  # pixels: the picture is reduced to about this before the grayscale check (speed only)

#: Debian packages read here (installed with --no-install-recommends; all data, a few MB to 95 MB each).
APT_PACKAGES = ("desktop-base", "digikam-data", "gimp-help-en", "gnome-backgrounds", "hugin-data",
                "imagemagick-6-doc", "lomiri-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
                "mate-backgrounds", "mypaint-data-extras", "opencv-doc", "plasma-workspace-wallpapers",
                "sway-backgrounds", "ukui-wallpapers", "xfdesktop4-data")
#: PyPI packages read for the images inside their wheels, installed without dependencies into PYPI_TARGET.
PYPI_PACKAGES = {"scikit-image": "0.26.0", "scikit-learn": "1.9.1"}
#: PyPI packages the project itself requires (requirements.txt); read from the running environment.
PROJECT_PACKAGES = ("matplotlib",)


@dataclass(frozen=True)
class Entry:
    package: str
    path: str  # absolute for a Debian package; inside the installed distribution for a PyPI one
    kind: str
    label: str
    name: str = ""  # the image's name in its id when the file's own name does not tell it apart


def _group(package: str, folder: str, rows: tuple[tuple[str, ...], ...]) -> list[Entry]:
    """Entries from ``(kind, file under folder, label[, name])`` rows."""
    return [Entry(package, folder + file, kind, label, *name) for kind, file, label, *name in rows]


P, N = PHOTO, NONPHOTO
_WALL = "/usr/share/wallpapers/{}/contents/images/"
#: The images, chosen by looking at each one: photographs of varied content for ``photo``; drawings, renders,
#: clip art, screenshots, diagrams, textures, microscopy and astronomy for ``nonphoto``. Left out: near-copies
#: of one scene (stereo pairs, other resolutions, filtered versions, dark/light twins), transparent overlays
#: meant to sit on a colour, and files under a few KB.
CATALOGUE: tuple[Entry, ...] = tuple([
    *_group("scikit-image", "skimage/data/", (
        (P, "astronaut.png", "person"), (P, "chelsea.png", "animal"), (P, "coffee.png", "food"),
        (P, "rocket.jpg", "vehicle"), (P, "motorcycle_left.png", "vehicle"), (P, "camera.png", "person"),
        (P, "coins.png", "object"),
        (N, "hubble_deep_field.jpg", "astronomy"), (N, "moon.png", "astronomy"), (N, "ihc.png", "microscopy"),
        (N, "cell.png", "microscopy"), (N, "retina.jpg", "medical"), (N, "color.png", "colour wheel"),
        (N, "logo.png", "logo"), (N, "horse.png", "silhouette"), (N, "page.png", "document scan"))),
    *_group("scikit-learn", "sklearn/datasets/images/", (
        (P, "china.jpg", "building"), (P, "flower.jpg", "plant"))),
    *_group("matplotlib", "matplotlib/mpl-data/sample_data/", (
        (P, "grace_hopper.jpg", "person"), (N, "Minduka_Present_Blue_Pack.png", "clip art"),
        (N, "logo2.png", "logo"))),
    *_group("mate-backgrounds", "/usr/share/backgrounds/mate/", (
        (P, "nature/Aqua.jpg", "water"), (P, "nature/Blinds.jpg", "plant"), (P, "nature/Dune.jpg", "landscape"),
        (P, "nature/FreshFlower.jpg", "plant"), (P, "nature/Garden.jpg", "plant"),
        (P, "nature/GreenMeadow.jpg", "plant"), (P, "nature/LadyBird.jpg", "insect"),
        (P, "nature/RainDrops.jpg", "plant"), (P, "nature/Storm.jpg", "sky"), (P, "nature/TwoWings.jpg", "plant"),
        (P, "nature/Wood.jpg", "texture"), (P, "nature/YellowFlower.jpg", "plant"),
        (N, "abstract/Elephants.jpg", "abstract art"), (N, "abstract/Gulp.png", "abstract, transparent"),
        (N, "desktop/Float-into-MATE.png", "abstract"), (N, "desktop/GreenTraditional.jpg", "logo"),
        (N, "desktop/Ubuntu-Mate-Cold-no-logo.png", "abstract"))),
    *_group("lomiri-wallpapers-16.04", "/usr/share/backgrounds/", (
        (P, "Bridge_by_Sander_Klootwijk.jpg", "architecture"), (P, "Dragonfly_by_Bolly.jpg", "plant"),
        (P, "Picture_0B_by_freespace.jpg", "food"), (P, "Picture_1A_by_freespace.jpg", "object"),
        (P, "Wine_by_Jakkub_Mede.jpg", "indoor"), (P, "aitzgorri_by_Aitzol_Berasategi.jpg", "landscape"),
        (P, "free_by_Peter_Nerlich.jpg", "animal"), (P, "friends_by_Aitzol_Berasategi.jpg", "animal"),
        (P, "greentock_by_Peter_Nerlich.jpg", "object"), (P, "life_by_Aitzol_Berasategi.jpg", "landscape"),
        (P, "picosdeeuropa_by_Aitzol_Berasategi.jpg", "landscape"),
        (P, "seeding_by_Clements_Engelhardt.jpg", "plant"), (P, "sunset_by_Aitzol_Berasategi.jpg", "landscape"),
        (N, "umang_by_Abhishek_Mudgal.jpg", "abstract"))),
    *_group("lomiri-wallpapers-20.04", "/usr/share/backgrounds/", (
        (P, "Kleiber_by_Lukas_Baubkus.jpg", "plant"), (N, "Fossa_by_Jasper_Roks.jpg", "illustration"),
        (N, "Painting-Colors_by__herobrine7gamer.jpg", "abstract"), (N, "Infinite-Sea_by_Aury88.jpg", "digital art"))),
    *_group("lomiri-wallpapers", "/usr/share/backgrounds/", ((N, "warty-final-ubuntu.png", "abstract"),)),
    *_group("ukui-wallpapers", "/usr/share/backgrounds/", tuple((N, name, label) for name, label in (
        ("2004default.jpg", "abstract"), ("calla.png", "illustration"), ("city.png", "illustration"),
        ("desert.png", "illustration"), ("firstgeneration.jpg", "illustration"), ("fluent-color.png", "abstract"),
        ("focal-ubuntukylin.png", "abstract"), ("goldfish.png", "illustration"), ("rhythm.jpg", "abstract"),
        ("rollpaper.png", "illustration"), ("string.jpg", "abstract"), ("the-mouse.jpg", "illustration")))),
    *[Entry("plasma-workspace-wallpapers", _WALL.format(name) + "2560x1600.jpg", P, label, name) for name, label in (
        ("BytheWater", "landscape"), ("ColdRipple", "landscape"), ("ColorfulCups", "object"),
        ("DarkestHour", "landscape"), ("EveningGlow", "landscape"), ("FallenLeaf", "plant"),
        ("Grey", "architecture"), ("Kite", "sky"), ("OneStandsOut", "plant"), ("Path", "landscape"),
        ("summer_1am", "landscape"))],
    *[Entry("plasma-workspace-wallpapers", _WALL.format(name) + file, N, label, name) for name, file, label in (
        ("Altai", "5120x2880.png", "illustration"), ("Autumn", "2560x1600.jpg", "painting"),
        ("Canopee", "3840x2160.png", "illustration"), ("Cascade", "3840x2160.png", "abstract"),
        ("Cluster", "3840x2160.png", "abstract"), ("Elarun", "2560x1600.png", "abstract"),
        ("Flow", "5120x2880.jpg", "illustration"), ("FlyingKonqui", "2560x1600.png", "cartoon"),
        ("Honeywave", "5120x2880.jpg", "abstract"), ("IceCold", "5120x2880.png", "abstract"),
        ("Kay", "5120x2880.png", "abstract"), ("Kokkini", "3840x2160.png", "abstract"),
        ("MilkyWay", "5120x2880.png", "abstract"), ("Opal", "3840x2160.png", "abstract"),
        ("PastelHills", "3200x2000.jpg", "illustration"), ("Patak", "5120x2880.png", "abstract"),
        ("SafeLanding", "5120x2880.jpg", "illustration"), ("Shell", "5120x2880.jpg", "abstract"),
        ("Volna", "5120x2880.jpg", "illustration"))],
    *_group("gnome-backgrounds", "/usr/share/backgrounds/gnome/", tuple((N, name, "abstract") for name in (
        "adwaita-l.webp", "grid-l.webp", "licorice-l.webp", "pixels-l.webp", "symbolic-l.webp", "truchet-d.webp",
        "wood-l.webp"))),
    *_group("sway-backgrounds", "/usr/share/backgrounds/sway/", ((N, "Sway_Wallpaper_Blue_1920x1080.png", "logo"),)),
    *_group("xfdesktop4-data", "/usr/share/backgrounds/xfce/", tuple((N, name, "abstract") for name in (
        "xfce-blue.jpg", "xfce-stripes.png", "xfce-teal.jpg", "xfce-verticals.png"))),
    *_group("desktop-base", "/usr/share/", (
        (N, "desktop-base/emerald-theme/grub/grub-16x9.png", "abstract", "emerald-grub"),
        (N, "desktop-base/softwaves-theme/grub/grub-16x9.png", "abstract", "softwaves-grub"),
        (N, "plymouth/themes/spacefun/background.png", "illustration", "spacefun-background"))),
    *_group("opencv-doc", "/usr/share/doc/opencv-doc/examples/", (
        (P, "alphamat/input_images/plant.jpg", "plant"), (P, "data/aero1.jpg", "aerial"),
        (P, "data/aloeL.jpg", "plant"), (P, "data/apple.jpg", "food"), (P, "data/baboon.jpg", "animal"),
        (P, "data/basketball1.png", "people"), (P, "data/board.jpg", "object"),
        (P, "data/box_in_scene.png", "object"), (P, "data/building.jpg", "architecture"),
        (P, "data/butterfly.jpg", "insect"), (P, "data/chicky_512.png", "animal"),
        (P, "data/ela_original.jpg", "object"), (P, "data/fruits.jpg", "food"), (P, "data/graf1.png", "street art"),
        (P, "data/home.jpg", "architecture"), (P, "data/left.jpg", "indoor"), (P, "data/left01.jpg", "indoor"),
        (P, "data/leuvenA.jpg", "street"), (P, "data/licenseplate_motion.jpg", "vehicle"),
        (P, "data/messi5.jpg", "sport"), (P, "data/orange.jpg", "food"), (P, "data/rubberwhale1.png", "indoor"),
        (P, "data/squirrel_cls.jpg", "animal"), (P, "data/stuff.jpg", "object"), (P, "hfs/data/000.jpg", "animal"),
        (P, "hfs/data/002.jpg", "landscape"), (P, "reg/home.png", "architecture", "home-reg"),
        (P, "dnn_superres/butterfly.png", "insect", "butterfly-superres"),
        *((P, f"text/scenetext0{i}.jpg", "street sign") for i in range(1, 7)),
        *((P, f"text/scenetext_segmented_word0{i}.jpg", "sign") for i in range(1, 6)),
        (N, "data/Blender_Suzanne1.jpg", "3D render"), (N, "data/aloeGT.png", "depth map"),
        (N, "data/cards.png", "drawing"), (N, "data/chessboard.png", "pattern"), (N, "data/detect_blob.png", "shapes"),
        (N, "data/digits.png", "handwriting"), (N, "data/ellipses.jpg", "shapes"), (N, "data/gradient.png", "gradient"),
        (N, "data/imageTextN.png", "document"), (N, "data/ml.png", "3D clip art"), (N, "data/opencv-logo.png", "logo"),
        (N, "data/HappyFish.jpg", "cartoon"), (N, "data/LinuxLogo.jpg", "logo"),
        *((N, f"data/pic{i}.png", "shapes") for i in range(2, 7)),
        (N, "data/smarties.png", "3D render"), (N, "data/starry_night.jpg", "painting"),
        (N, "fuzzy/input.png", "anime drawing"), (N, "ximgproc/stanford.png", "map screenshot"))),
    *_group("hugin-data", "/usr/share/hugin/xrc/data/help_en_EN/", (
        (P, "250px-LagardePont-defish.jpg", "architecture"),
        (P, "600px-Tuebingen_Neckarfront_small15_2006-06-11.jpg", "town"),
        (P, "800px-C_Marchi-GrandCentral-adj.jpg", "indoor"), (P, "AliasingPScubic.jpg", "indoor"),
        (P, "Big_ben_rectilinear.jpg", "indoor"), (P, "CA_fringes00.jpg", "landscape"),
        (P, "CA_fringes01.jpg", "plant"), (P, "CA_tCA00.jpg", "architecture"), (P, "SB_Blended.jpg", "indoor"),
        (P, "Medinet_habu_horizontal_stereographic.jpg", "architecture"),
        *((N, name, "screenshot") for name in (
            "Celeste_cpeditor_post.jpg", "Celeste_preferences.jpg", "Celeste_images_panel.jpg",
            "200px-Hugin-2011.0_fpw_overview.png", "200px-Panoglview.png", "300px-Fast_preview_guide_identify.png",
            "300px-SimpleGui_stitch_popup.png", "500px-Hugin2013_projection_tab.png", "Autopano-prefs.png",
            "Autopano-searching.png")),
        (N, "Illustration4.png", "diagram"), (N, "400px-220x120deg-panini-grid.png", "diagram"))),
    *_group("gimp-help-en", "/usr/share/gimp/2.0/help/en/images/", (
        (P, "filters/examples/taj_orig.jpg", "architecture"), (P, "filters/examples/blur/mean_curvature-ex-1.jpg", "plant"),
        (P, "filters/examples/distort/spherize-ex-orig.jpg", "plant"),
        (P, "filters/examples/light-and-shadow/vignette-ex-orig.jpg", "animal"),
        (P, "filters/examples/map/little_planet-origin.jpg", "landscape"),
        (P, "filters/examples/map/pan-project-result-1.jpg", "landscape"),
        (P, "filters/examples/tone-mapping-reinhard.jpg", "object"),
        (P, "tutorials/quickie-flip-example-source.jpg", "people"), (P, "tutorials/quickie-jpeg-100.jpg", "vehicle"),
        (P, "tutorials/quickie-remove-background-source.jpg", "plant"),
        (P, "tutorials/quickie-rotate-example-source.jpg", "architecture"),
        (P, "tutorials/tone-mapping/apple-orchard-truck-from-camera.jpg", "vehicle"),
        (P, "tutorials/tone-mapping/power-lines.jpg", "landscape"),
        (P, "tutorials/tone-mapping/tree-exposed-for-sky-ground-is-dark.jpg", "landscape"),
        (P, "using/keyfob_orig.png", "object"),
        (N, "filters/examples/render-checkerboard2.jpg", "pattern"), (N, "filters/examples/render-circuit.jpg", "pattern"),
        (N, "filters/examples/map/displace-ex-1.png", "text art"),
        (N, "glossary/companding-curves-compared.png", "chart"),
        (N, "toolbox/smudge-simpletest.jpg", "diagram"), (N, "toolbox/transform-image-ex2.jpg", "diagram"),
        *((N, name, "screenshot") for name in (
            "filters/render/jigsaw.png", "preferences/prefs-icon-theme.png",
            "menus/image/color-management/assign-4.png", "tutorials/quickie-mode-menu.png",
            "using/gimp-curves-tool-2-4-vs-2-6.png", "using/pattern-checked.png", "using/single-window-mode.png",
            "toolbox/3DTransf-linked.jpg", "tutorials/tone-mapping/histogram-specular-highlights.jpg",
            "tutorials/tone-mapping/orchard-truck-layer-stack.jpg")))),
    *_group("imagemagick-6-doc", "/usr/share/doc/imagemagick-6-common/html/images/", (
        (P, "bluebells_lin.jpg", "plant"), (N, "wizard.jpg", "clip art"), (N, "logo.jpg", "clip art"),
        (N, "julia-set.png", "fractal"), (N, "piechart.png", "chart"), (N, "cylinder_shaded.png", "clip art"),
        (N, "configure.jpg", "screenshot"), (N, "t-shirt.png", "clip art"), (N, "radial-gradient.png", "gradient"))),
    *_group("digikam-data", "/usr/share/digikam/", (
        (P, "about/images/body-background.jpg", "landscape"),
        *((N, f"data/{name}.png", "texture") for name in (
            "bricks-texture", "granit-pattern", "leaf-pattern", "marble-texture", "stone-pattern", "wood-pattern")))),
    *_group("mypaint-data-extras", "/usr/share/mypaint/backgrounds/", (
        (N, "ramon/HR_Cork.png", "texture"), (N, "ramon/HR_WaterColor.png", "texture"),
        (N, "mrmamurk/mamurk_b_1.png", "texture"))),
])


class ManifestError(ValueError):
    """The manifest or an image it names is missing or unreadable; the message is one line."""


# -- the split -------------------------------------------------------------------------


def split_of(sha256: str, salt: str = SPLIT_SALT) -> str:
    """``design`` or ``heldout`` from an image's own sha256 alone (never from the other images)."""
    return HELDOUT if hashlib.sha256(f"{salt}:{sha256}".encode()).digest()[0] & 1 else DESIGN


def split_counts(images: list[dict]) -> dict[str, dict[str, int]]:
    """``{kind: {split: n}}`` of manifest entries."""
    counts: dict[str, dict[str, int]] = {}
    for image in images:
        per_kind = counts.setdefault(image["kind"], {DESIGN: 0, HELDOUT: 0})
        per_kind[image["split"]] += 1
    return counts


# -- reading the manifest (what the measurement uses) -----------------------------------------


def load_manifest(path: Path = MANIFEST) -> dict:
    """The manifest as a dict; :class:`ManifestError` with one line when it is missing or not a manifest."""
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: run {BUILD_COMMAND} to build the image set and its manifest") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({type(exc).__name__}); rebuild it with {BUILD_COMMAND}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
        raise ManifestError(f"{path} has no list of images; rebuild it with {BUILD_COMMAND}")
    return manifest


def select(manifest: dict, split: str, kind: str | None = None, root: Path = IMAGES) -> list[tuple[dict, Path]]:
    """``(entry, file)`` for every image of ``split`` (and ``kind``), each file checked against its sha256.

    A missing or changed file raises :class:`ManifestError` (one line, with the command that rebuilds it).
    """
    if split not in (DESIGN, HELDOUT):
        raise ManifestError(f"unknown split {split!r}; choose {DESIGN} or {HELDOUT}")
    chosen = []
    for entry in manifest["images"]:
        if entry["split"] != split or (kind is not None and entry["kind"] != kind):
            continue
        file = Path(root) / entry["file"]
        if not file.is_file():
            raise ManifestError(f"{file} is missing: run {BUILD_COMMAND} (it prints what to install first)")
        if hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
            raise ManifestError(f"{file} is not the image the manifest names (sha256 differs): run {BUILD_COMMAND}")
        chosen.append((entry, file))
    return chosen


# -- where each package's files and licences are -------------------------------------------


def apt_version(package: str) -> str | None:
    """The installed version of a Debian package, or None when it is not installed."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True)
    status, _, version = out.stdout.partition("\t")
    return version if out.returncode == 0 and status.endswith(" installed") else None


def distribution(package: str) -> importlib.metadata.Distribution | None:
    """The installed PyPI distribution: ours from PYPI_TARGET, the project's own from the running environment."""
    path = [str(PYPI_TARGET)] if package in PYPI_PACKAGES else sys.path
    found = list(importlib.metadata.distributions(name=package, path=path))
    if not found or (package in PYPI_PACKAGES and found[0].version != PYPI_PACKAGES[package]):
        return None
    return found[0]


def dep5_license(copyright_text: str, path: str) -> str | None:
    """The ``License:`` of the last machine-readable copyright stanza whose ``Files:`` fit ``path``.

    Debian's patterns are paths in the source tree, not where a file is installed, so a pattern fits when it
    matches the end of the installed path, or (for a pattern naming one file) its file name. None: not DEP-5.
    """
    if not copyright_text.lstrip().startswith("Format:"):
        return None
    name, found = posixpath.basename(path), None
    for stanza in re.split(r"\n\s*\n", copyright_text):
        files = re.search(r"^Files?:(.*(?:\n[ \t].*)*)", stanza, re.M)
        licence = re.search(r"^License:[ \t]*(.*)", stanza, re.M)
        if not files or not licence:
            continue
        patterns = files.group(1).split()
        if any(fnmatch.fnmatchcase(path, "*/" + p) or ("*" not in p and posixpath.basename(p) == name)
               for p in patterns):
            found = f"{licence.group(1).strip()} (copyright stanza 'Files: {' '.join(patterns)[:80]}')"
    return found


def apt_license(package: str, path: str) -> str:
    doc = Path("/usr/share/doc") / package / "copyright"
    text = doc.read_text(errors="replace") if doc.is_file() else ""
    found = dep5_license(text, path)
    if found is None:  # free-form: the first line stating a licence after the file's name, else in the whole file
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if PurePosixPath(path).stem.lower() in line.lower()), None)
        stated = next((line.strip() for line in lines[start or 0:] if re.search(r"licen[cs]ed|License:|terms of", line)),
                      "no licence line found")
        found = stated if start is not None else f"no line names this file; the file's first licence line: {stated}"
    return f"{found}; see {doc}"


def pypi_license(package: str, dist: importlib.metadata.Distribution, rel: str) -> str:
    """What the package says about this file: scikit-image's loader docstring, scikit-learn's images README;
    otherwise the package's own licence field."""
    if package == "scikit-image":
        source = Path(dist.locate_file("skimage/data/_fetchers.py")).read_text()
        for block in re.split(r"\ndef ", source):
            if f"data/{posixpath.basename(rel)}" in block:
                said = [line.strip() for line in block.split("\n") if re.search(r"copyright|licen|public domain|CC0", line, re.I)]
                if said:
                    return " ".join(said) + " (skimage/data/_fetchers.py)"
    if package == "scikit-learn":
        readme = Path(dist.locate_file(posixpath.dirname(rel) + "/README.txt")).read_text()
        for block in readme.split("Image: ")[1:]:
            if block.startswith(posixpath.basename(rel)):
                return " ".join(block.split("\n")[1:3]).strip() + " (sklearn/datasets/images/README.txt)"
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if licence.startswith("Files:"):  # the licence field holds a machine-readable copyright file
        unfolded = "\n".join(line[1:] if line.startswith(" ") else line for line in licence.split("\n"))
        licence = dep5_license("Format:\n\n" + unfolded, rel) or licence.split("\n")[0]
    return f"{licence.splitlines()[0] if licence else 'no licence field'} (the package's licence; no note for this file)"


# -- building ---------------------------------------------------------------------------


def missing_packages(catalogue: tuple[Entry, ...] = CATALOGUE) -> tuple[list[str], list[str]]:
    """``(apt, pypi)`` packages the catalogue needs that are not installed (at the pinned version for PyPI)."""
    needed = sorted({e.package for e in catalogue})
    apt = [p for p in needed if p in APT_PACKAGES and apt_version(p) is None]
    pypi = [p for p in needed if p not in APT_PACKAGES and distribution(p) is None]
    return apt, pypi


def install_commands(apt: list[str], pypi: list[str]) -> list[str]:
    """The exact commands that install what is missing (run from the repository root)."""
    commands = []
    if apt:
        commands.append("apt-get install -y --no-install-recommends " + " ".join(apt))
    ours = [f"{p}=={PYPI_PACKAGES[p]}" for p in pypi if p in PYPI_PACKAGES]
    if ours:
        target = PYPI_TARGET.relative_to(REPO) if PYPI_TARGET.is_relative_to(REPO) else PYPI_TARGET
        commands.append(f".venv/bin/python -m pip install --no-deps --target {target} " + " ".join(ours))
    if any(p in PROJECT_PACKAGES for p in pypi):
        commands.append(".venv/bin/python -m pip install -r requirements.txt")
    return commands


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def image_id(entry: Entry) -> str:
    return f"{entry.kind}-{slug(entry.package)}-{slug(entry.name or PurePosixPath(entry.path).stem)}"


def pixels_info(data: bytes) -> dict:
    """Pixel size, and whether the picture is grayscale (every pixel's channels within GRAY_SPREAD)."""
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        img.draft("RGB", (GRAY_SIDE, GRAY_SIDE))
        small = img.convert("RGB")
    small.thumbnail((GRAY_SIDE, GRAY_SIDE))
    rgb = np.asarray(small, dtype=np.int16)
    spread = int(np.abs(np.diff(rgb, axis=2)).max())
    return {"width": size[0], "height": size[1], "grayscale": spread <= GRAY_SPREAD}


def source_of(entry: Entry) -> tuple[Path, dict]:
    """The installed file of ``entry`` and its source record (package, version, original path, licence)."""
    if entry.package in APT_PACKAGES:
        file, version = Path(entry.path), apt_version(entry.package)
        licence, via = apt_license(entry.package, entry.path), "apt"
    else:
        dist = distribution(entry.package)
        file, version = Path(dist.locate_file(entry.path)), dist.version
        licence, via = pypi_license(entry.package, dist, entry.path), "pypi"
    if not file.is_file():
        raise ManifestError(f"{entry.package} {version} has no {entry.path}; the catalogue in {Path(__file__).name} needs updating")
    return file, {"package": entry.package, "version": version, "via": via, "original_path": entry.path, "license": licence}


def build(catalogue: tuple[Entry, ...] = CATALOGUE, images_dir: Path = IMAGES, manifest_path: Path = MANIFEST) -> dict:
    """Copy every catalogue image into ``images_dir`` and write the manifest; returns it."""
    ids = [image_id(e) for e in catalogue]
    if len(set(ids)) != len(ids):  # before any copy: one would overwrite the other
        raise ManifestError(f"two catalogue entries share an id: {sorted({i for i in ids if ids.count(i) > 1})}")
    records = []
    for entry in catalogue:
        file, source = source_of(entry)
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        name = image_id(entry) + file.suffix.lower()
        target = images_dir / name
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest):
            atomic_write_bytes(target, data)
        records.append({"id": image_id(entry), "file": name, "kind": entry.kind, "label": entry.label,
                        "split": split_of(digest), "sha256": digest, "bytes": len(data), **pixels_info(data),
                        "source": source})
    for stale in set(p.name for p in images_dir.iterdir()) - {r["file"] for r in records}:
        (images_dir / stale).unlink()
    records.sort(key=lambda r: r["id"])
    manifest = {"about": "Real images (not CIFAR-10) for the contract meter, issue 20; rebuilt by " + BUILD_COMMAND,
                "images_folder": str(images_dir.relative_to(REPO)) if images_dir.is_relative_to(REPO) else str(images_dir),
                "split_rule": f"heldout when the first byte of sha256('{SPLIT_SALT}:' + image sha256) is odd",
                "install": install_commands(list(APT_PACKAGES), list(PYPI_PACKAGES)),
                "counts": split_counts(records), "images": records}
    atomic_write_json(manifest_path, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report missing packages and the commands installing them")
    args = p.parse_args(argv)
    apt, pypi = missing_packages()
    if apt or pypi:
        print(f"missing: {' '.join(apt + pypi)}; install them with:")
        for command in install_commands(apt, pypi):
            print("  " + command)
        return 1
    if args.check:
        print(f"every source of the {len(CATALOGUE)} images is installed")
        return 0
    try:
        manifest = build()
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, counts in manifest["counts"].items():
        gray = sum(1 for r in manifest["images"] if r["kind"] == kind and r["grayscale"])
        print(f"{kind:9s} design {counts[DESIGN]:3d}  heldout {counts[HELDOUT]:3d}  ({gray} grayscale)")
    print(f"{len(manifest['images'])} images in {IMAGES.relative_to(REPO)}; manifest {MANIFEST.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
