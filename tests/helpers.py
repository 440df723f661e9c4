"""Small data the tests make for themselves (no ../shared needed)."""

import torch
from PIL import Image


def make_folder_dataset(root, classes=("cat", "dog"), n_train=6, n_test=3, size=32):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                arr[..., c % 3] = 255  # class c has a saturated channel
                Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root
