"""Datasets: folder layout, bad input, subsets, augmentation, the loader."""

import pytest
import torch
from PIL import Image

from cifar_transfer.data import BatchLoader, DataError, load_dataset, random_crop_flip, split_validation
from tests.helpers import make_folder_dataset


def test_folder_dataset_is_decoded_to_uint8_with_sorted_classes(tmp_path):
    ds = load_dataset(make_folder_dataset(tmp_path, classes=("dog", "cat")))
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (12, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # the saturated channel survives decoding: class "cat" (made with c=1) has G == 255
    assert (ds.train.images[:6, 1] == 255).all()


def test_images_of_other_sizes_are_resized_to_image_size(tmp_path):
    ds = load_dataset(make_folder_dataset(tmp_path, size=48), image_size=32)
    assert ds.train.images.shape[-2:] == (32, 32)


def test_class_subset_and_per_class_limit(tmp_path):
    ds = load_dataset(make_folder_dataset(tmp_path, classes=("a", "b", "c")), classes=["c", "a"], max_per_class=2,
                      max_test_per_class=1)
    assert ds.classes == ["c", "a"]
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and len(ds.test) == 2


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        load_dataset(tmp_path / "nowhere")


def test_wrong_layout_says_what_was_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="unknown layout: expected train/ and test/"):
        load_dataset(tmp_path)


def test_mismatched_class_folders_are_reported(tmp_path):
    make_folder_dataset(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "bird" / "0.png")
    with pytest.raises(DataError, match="different class folders"):
        load_dataset(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    make_folder_dataset(tmp_path)
    bad = tmp_path / "train" / "cat" / "0003.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*0003\.png"):
        load_dataset(tmp_path)


def test_empty_class_folder_is_reported(tmp_path):
    make_folder_dataset(tmp_path)
    for p in (tmp_path / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path)


def test_validation_split_is_stratified_and_disjoint(tmp_path):
    ds = split_validation(load_dataset(make_folder_dataset(tmp_path, n_train=10)), 0.2, seed=1)
    assert len(ds.train) == 16 and len(ds.val) == 4
    assert ds.val.labels.bincount().tolist() == [2, 2]
    flat = lambda s: {tuple(x.flatten().tolist()) for x in s.images}  # noqa: E731
    assert not flat(ds.train) & flat(ds.val)


def test_random_crop_flip_keeps_content_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = random_crop_flip(x, g, pad=4)
    assert y.shape == x.shape and y.dtype == torch.uint8
    # zero padding enters only through crops; an unshifted, unflipped crop equals its source
    same = [(y[i] == x[i]).all() or (y[i] == x[i].flip(2)).all() for i in range(64)]
    assert 0 < sum(same) < 64
    # each output row is a (possibly flipped) shifted window of the padded source: its non-zero pixels come from x[i]
    for i in range(8):
        assert set(y[i][y[i] > 0].tolist()) <= set(x[i].flatten().tolist())


def test_flip_only_augmentation_mirrors_the_width_axis():
    """Without crops every image comes back as itself or its left-right mirror, never upside down; both occur."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = random_crop_flip(x, g, pad=0)
    kept = [bool((y[i] == x[i]).all()) for i in range(64)]
    mirrored = [bool((y[i] == x[i].flip(2)).all()) for i in range(64)]  # (C, H, W): axis 2 is the width
    assert all(k or m for k, m in zip(kept, mirrored))
    assert 0 < sum(mirrored) < 64
    # with crops too: columns numbered 1..8 left to right come back in order or reversed (a shifted window)
    cols = torch.arange(1, 9, dtype=torch.uint8).expand(64, 3, 8, 8).contiguous()
    row = random_crop_flip(cols, torch.Generator().manual_seed(1), pad=2)[:, 0, 4]
    order = [torch.sign(r[r > 0].long().diff()).unique().tolist() for r in row]
    assert all(o in ([1], [-1]) for o in order) and [-1] in order and [1] in order


def test_loader_is_seeded_per_epoch_and_shards_disjointly():
    from cifar_transfer.data import Split

    split = Split(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous(), torch.arange(20))
    a = BatchLoader(split, 4, shuffle=True, seed=3)
    first = torch.cat([y for _, y in a])
    assert sorted(first.tolist()) == list(range(20))
    assert torch.equal(first, torch.cat([y for _, y in BatchLoader(split, 4, shuffle=True, seed=3)]))
    a.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in a]))
    r0 = torch.cat([y for _, y in BatchLoader(split, 3, shuffle=True, rank=0, world_size=2)])
    r1 = torch.cat([y for _, y in BatchLoader(split, 3, shuffle=True, rank=1, world_size=2)])
    assert len(r0) == len(r1) == 10 and not set(r0.tolist()) & set(r1.tolist())


def test_shared_jpeg_copy_loads_as_cifar10(shared_data):
    ds = load_dataset(shared_data, max_per_class=5, max_test_per_class=5)
    assert ds.name == "CIFAR-10 (JPEG copy)"
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.train.images.shape == (50, 3, 32, 32)
