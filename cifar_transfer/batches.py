"""The batch sources of every training: augmented images (:class:`ImageBatches`), or cached outputs of a frozen
prefix (:class:`FeatureCache`, served by :class:`CachedBatches`).

A batch source has ``len()`` (steps per epoch), ``epoch(e)`` (exactly that many ``(x, y)`` batches on the
device, the same for the same ``e``: a resumed run sees the batches a straight one does), ``features`` (True:
``x`` is the frozen prefix's output, False: preprocessed images the prefix still has to run on), and
``eval_accuracy`` (the per-epoch score on the held-out split seen the same way; ``train`` only).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from .evaluate import predict_probabilities
from .inference import class_probabilities, mirror


class FeatureCache:
    """The frozen prefix's outputs for ``views`` copies of a split (view 0 as it is, the others with a random crop
    and flip when ``augment``), computed once by ``run`` (see :func:`cifar_transfer.inference.prefix_runner`) in
    batches of ``batch_size`` and stored as ``dtype`` on ``store`` (train: fp16 on the CPU; the study: float32
    on the device)."""

    def __init__(self, run, split: data_mod.Split, preprocess: nn.Module, device: torch.device, views: int, seed: int,
                 batch_size: int, augment: bool, *, dtype: torch.dtype = torch.float16, store: str | torch.device = "cpu",
                 channels_last: bool = False, progress: bool = False, name: str = "train"):
        self.labels = split.labels
        self.views: list[torch.Tensor] = []
        for v in range(views):
            loader = data_mod.BatchLoader(split, batch_size, augment=augment and v > 0, seed=seed + 1000 * v)
            chunks = []
            with torch.no_grad():  # not inference_mode: the outputs are trained on (inference tensors cannot be)
                for x, _ in tqdm(loader, desc=f"caching {name} features, view {v + 1}/{views}", disable=not progress,
                                 leave=False):
                    x = preprocess(x.to(device))
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    chunks.append(run(x).to(store, dtype))
            self.views.append(torch.cat(chunks))


class ImageBatches:
    """Augmented (random crop + flip) training images, preprocessed on the device; a fresh shuffle, and with
    ``world_size > 1`` a fresh shard per rank, every epoch (:class:`cifar_transfer.data.BatchLoader`)."""

    features = False

    def __init__(self, train: data_mod.Split, preprocess: nn.Module, device: torch.device, batch_size: int, seed: int,
                 *, rank: int = 0, world_size: int = 1, evaluation: data_mod.Split | None = None, eval_name: str = "test"):
        self.loader = data_mod.BatchLoader(train, batch_size, shuffle=True, augment=True, seed=seed, rank=rank,
                                           world_size=world_size, drop_last=True)
        self.evaluation, self.eval_name, self.preprocess, self.device = evaluation, eval_name, preprocess, device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        self.loader.set_epoch(epoch)
        for xb, yb in self.loader:
            yield self.preprocess(xb.to(self.device, non_blocking=True)), yb.to(self.device, non_blocking=True)

    @torch.no_grad()
    def eval_accuracy(self, net, batch_size: int, tta_flip: bool) -> float:
        """The whole model's (``net.model``) accuracy on the held-out images (leaves the model in eval mode)."""
        net.model.eval()
        # PyTorch: the weights change every epoch, an ONNX export each time would cost more than it saves
        probs = predict_probabilities(net.model, self.evaluation, device=self.device, batch_size=batch_size,
                               tta_flip=tta_flip, engine="pytorch")
        return (probs.argmax(1) == self.evaluation.labels).float().mean().item()


class CachedBatches:
    """Batches of cached frozen-prefix features: epoch ``e`` shuffles view ``e mod views``.

    Two streams, each kept as the results it made were made: ``flip=True`` (train's ``--cache-features``) draws
    the order from a generator seeded ``seed * 7_919 + e`` and then flips each feature map horizontally with
    probability 1/2; ``flip=False`` (the study's cells) takes the order :class:`~cifar_transfer.data.BatchLoader`
    takes (``seed * 100_003 + e``) and no flip."""

    features = True

    def __init__(self, cache: FeatureCache, device: torch.device, batch_size: int, seed: int, *, flip: bool = True,
                 evaluation: FeatureCache | None = None, eval_name: str = "test"):
        self.cache, self.evaluation, self.eval_name = cache, evaluation, eval_name
        self.device, self.batch_size, self.seed, self.flip = device, batch_size, seed, flip

    def __len__(self) -> int:
        return len(self.cache.labels) // self.batch_size

    def epoch(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * (7_919 if self.flip else 100_003) + epoch)
        feats = self.cache.views[epoch % len(self.cache.views)]
        perm = torch.randperm(len(feats), generator=g)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            x = feats[idx.to(feats.device)].to(self.device, torch.float32)
            if self.flip:
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip.to(self.device)[:, None, None, None], mirror(x), x)
            yield x, self.cache.labels[idx].to(self.device)

    @torch.no_grad()
    def eval_accuracy(self, net, batch_size: int, tta_flip: bool) -> float:
        """The trainable stages' (``net.trainable``) accuracy on the cached held-out features (rank 0 only has them)."""
        trainable, feats, labels = net.trainable, self.evaluation.views[0], self.evaluation.labels
        trainable.eval()
        correct = 0
        for i in range(0, len(feats), batch_size):
            x = feats[i:i + batch_size].to(self.device, torch.float32)
            probs = class_probabilities(trainable, x, tta_flip)
            correct += (probs.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
        trainable.train()
        return correct / len(feats)
