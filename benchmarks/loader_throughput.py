"""Is the input pipeline ever the bottleneck? Loader throughput vs. the model's train-step throughput.

    python benchmarks/loader_throughput.py [--input-size 96] [--backbone efficientnet_lite0]

Loader: in-memory uint8 CIFAR-sized batches, shuffled, random crop + flip as batched
tensor ops, then the contract transform (resize + normalize). Train step: forward,
backward and SGD step of the full network (nothing frozen) on the same batch size.
Random pixels stand in for images: throughput does not depend on content. Prints
images/second for both and their ratio (target: loader >= 5x train step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cifar_transfer.data import BatchLoader, Split  # noqa: E402
from cifar_transfer.model import CifarTransferModel  # noqa: E402


def images_per_second(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone whose train step is measured")
    p.add_argument("--input-size", type=int, default=96, help="network input side in pixels")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--steps", type=int, default=3, help="timed train steps")
    p.add_argument("--channels-last", action="store_true", help="NHWC layout for the train step")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bfloat16 autocast for the train step (CPU autocast; fast only where the CPU has bf16 units)")
    args = p.parse_args(argv)

    n = 10_000
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    model = CifarTransferModel.from_backbone(args.backbone, input_size=args.input_size, pretrained=False)
    transform = model.preprocess
    loader = BatchLoader(split, args.batch_size, shuffle=True, augment=True, drop_last=True)

    def one_epoch():
        for x, _ in loader:
            transform(x)

    loader_ips = images_per_second(one_epoch, len(loader) * args.batch_size, repeats=2)

    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = transform(split.images[: args.batch_size])
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = split.labels[: args.batch_size]
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step_ips = images_per_second(step, args.batch_size, repeats=args.steps)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"loader (shuffle + crop/flip + resize to {args.input_size}px + normalize): {loader_ips:,.0f} images/s")
    print(f"train step ({args.backbone}, full network, {args.input_size}px, batch {args.batch_size}, amp {args.amp}): {step_ips:,.1f} images/s")
    print(f"loader / train step: {loader_ips / step_ips:.1f}x")


if __name__ == "__main__":
    main()
