"""Latency of one-variant vs all-variants prediction, in process and through the app's API.

    python benchmarks/app_latency.py [--checkpoint DIR] [--runs 60] [--engine onnxruntime pytorch] [--json out.json]
    python benchmarks/app_latency.py --vs-bare [--checkpoint DIR] [--runs 60] [--threads 1] [--json out.json]

"one variant" is the correct contract alone; "default" is the correct contract
plus contract.DEFAULT_DEMO_VARIANTS (what the app shows by default, one batch
of 4); "all" adds every wrong variant (a batch of 7). Two levels:

* ``predictor``: ``Predictor.predict`` on an example PNG (decode, one forward
  pass, meter, display pictures);
* ``http``: the app served on 127.0.0.1, called through its REST API as
  curl would (upload, ``POST /gradio_api/call/predict``, read the answer):
  what one request costs end to end; ``--gradio-client`` adds the same
  through ``gradio_client``, whose polling adds a fixed ~0.2 s per call.

Each level runs once per engine (``--engine``, default both ``onnxruntime`` and
``pytorch``, back to back in this one process): the app's predictor gets that
engine (``cifar_transfer.engine.make_engine`` for the same model and meter
layers), so the in-process and HTTP numbers of both engines come from the same
run on the same machine. The JSON holds ``engines.<engine>.levels`` and the
load average before and after.

Goals: issue 4, default ≤ 1.3 × one variant and p50 ≤ 0.25 s; issue 14, all
variants p50 ≤ 20 ms in process.

``--vs-bare`` (issue 20) times only the app's all-panel answer in process (``Predictor.predict`` of the image
with every variant: decoding, the engine's one pass, the meter, the display pictures) against a bare eager
PyTorch forward of the same 7 network inputs (``model(x)`` in inference mode, channels-last as the predictor
holds the model), interleaved call by call in one run (the order alternates each round), and reports the
medians, their ratio and the median of the per-round ratios, with the load average before and after. It
imports no Gradio and only ``Predictor``, ``load_checkpoint`` and ``read_metrics``, so the same file times an
older commit's predictor when run from that commit's checkout (``git worktree add``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "mean": statistics.fmean(s), "n": len(s)}


def engine_for(predictor, name: str):
    """An inference engine ``name`` for ``predictor``'s model and meter layers; refuses a silent fallback."""
    from cifar_transfer.engine import make_engine
    from cifar_transfer.meter import batchnorm_layers

    names = {id(module): layer for layer, module in batchnorm_layers(predictor.model)}
    engine = make_engine(predictor.model, [names[id(bn)] for bn in predictor._bns], predictor.contract.input_size,
                         prefer=name)
    if engine.name != name:
        raise SystemExit(f"error: asked for {name}, got {engine.name} (see the warning above)")
    return engine


def timed(fn, runs: int, warmup: int = 5) -> dict[str, float]:
    """Wall-clock percentiles, plus the median CPU time of this process per call (``cpu_p50``).

    With one torch thread and a busy machine, CPU time is what the call would
    take on an idle core; wall time is what it took here.
    """
    for _ in range(warmup):
        fn()
    samples, cpu = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {**percentiles(samples), "cpu_p50": percentiles(cpu)["p50"]}


def vs_bare(checkpoint: str, image: str, runs: int, warmup: int = 10, threads: int | None = None) -> dict:
    """The app's all-panel answer against a bare eager forward of its 7 inputs, interleaved (see the module doc).

    ``threads``: torch's intra-op threads, and so ONNX Runtime's (the engine takes torch's count); default torch's own."""
    import torch

    from cifar_transfer.contract import CORRECT_KEY, WRONG_VARIANTS
    from cifar_transfer.model import load_checkpoint, read_metrics
    from cifar_transfer.predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    folder = Path(checkpoint)
    has_calibration = (folder / "meter_calibration.json").is_file()  # as app.load_predictor
    predictor = Predictor(load_checkpoint(folder), read_metrics(folder), calibration=folder if has_calibration else None)
    keys = [CORRECT_KEY, *WRONG_VARIANTS]
    x = predictor.network_input(predictor.read(image), keys).contiguous(memory_format=torch.channels_last)
    model = predictor.model

    def app_answer():
        predictor.predict(image, list(WRONG_VARIANTS))

    def bare():
        with torch.inference_mode():
            model(x)

    calls = {"app": app_answer, "bare": bare}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    load_before = [round(v, 2) for v in os.getloadavg()]
    samples = {name: [] for name in calls}
    for i in range(runs):
        for name in (("app", "bare") if i % 2 == 0 else ("bare", "app")):
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - t0)
    out = {name: percentiles(v) for name, v in samples.items()}
    out["ratio_of_medians"] = out["app"]["p50"] / out["bare"]["p50"]
    out["median_of_round_ratios"] = statistics.median(a / b for a, b in zip(samples["app"], samples["bare"]))
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    out.update(code=commit.stdout.strip() or None, inputs=len(x), input_size=int(x.shape[-1]), engine=predictor.engine.name,
               runs=runs, torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               loadavg_1_5_15={"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]})
    print(f"all-panel answer p50 {1000 * out['app']['p50']:.1f} ms ({out['engine']}) vs bare eager PyTorch forward of "
          f"the same {len(x)} inputs at {x.shape[-1]} px p50 {1000 * out['bare']['p50']:.1f} ms: "
          f"{out['ratio_of_medians']:.2f}x (median of per-round ratios {out['median_of_round_ratios']:.2f}x); "
          f"{runs} interleaved rounds, load average {load_before} before, {out['loadavg_1_5_15']['after']} after")
    return out


class HttpApi:
    """The app's REST API as curl would use it: upload the file, POST /call/predict, read the result stream."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=60)

    def predict(self, image: str, variants: list[str]) -> dict:
        with open(image, "rb") as f:
            path = self.client.post("gradio_api/upload", files={"files": f}).raise_for_status().json()[0]
        payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, variants]}
        event = self.client.post("gradio_api/call/predict", json=payload).raise_for_status().json()["event_id"]
        text = self.client.get(f"gradio_api/call/predict/{event}").raise_for_status().text
        if "event: complete" not in text:
            raise RuntimeError(f"the app answered: {text[:300]}")
        return json.loads(text.split("data:", 1)[1].strip().splitlines()[0])[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint folder or Hub id (default: as app.py)")
    p.add_argument("--threads", type=int, help="torch threads (sets CIFAR_TRANSFER_THREADS; default: torch's own)")
    p.add_argument("--runs", type=int, default=60, help="timed calls per case")
    p.add_argument("--image", default=str(ROOT / "examples" / "cat_cifar10-test-00.png"))
    p.add_argument("--no-api", action="store_true", help="only time the predictor in process")
    p.add_argument("--gradio-client", action="store_true",
                   help="also time gradio_client calls (its polling adds a fixed ~0.2 s per call)")
    p.add_argument("--engine", nargs="+", default=["onnxruntime", "pytorch"], choices=["onnxruntime", "pytorch"],
                   help="inference engines to time, back to back (default: both)")
    p.add_argument("--vs-bare", action="store_true",
                   help="only the all-panel answer against a bare eager forward of its 7 inputs, interleaved (issue 20)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.vs_bare:
        from cifar_transfer.checkpoint import atomic_write_json

        result = vs_bare(args.checkpoint or str(ROOT / "checkpoints" / "efficientnet_lite0-cifar10"), args.image, args.runs,
                         threads=args.threads)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.json), result)
        return result
    if args.checkpoint:
        os.environ["CIFAR_TRANSFER_CHECKPOINT"] = args.checkpoint
    if args.threads:
        os.environ["CIFAR_TRANSFER_THREADS"] = str(args.threads)

    import torch

    from cifar_transfer.contract import DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS

    cases = {"one variant": [], "default": list(DEFAULT_DEMO_VARIANTS), "all": list(WRONG_VARIANTS)}
    import app  # builds the demo: loads the model once

    predictor = app.demo.predictor
    results = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "runs": args.runs,
               "loadavg_1_5_15": {"before": [round(x, 2) for x in os.getloadavg()]}, "engines": {}}
    url = None
    if not args.no_api:
        _, url, _ = app.launch(app.demo, host="127.0.0.1", port=None, prevent_thread_lock=True, quiet=True)
    try:
        for name in args.engine:
            predictor.engine = engine_for(predictor, name)
            levels = {"predictor": {case: timed(lambda v=v: predictor.predict(args.image, v), args.runs)
                                    for case, v in cases.items()}}
            if url:
                http = HttpApi(url)
                levels["http"] = {case: timed(lambda v=v: http.predict(args.image, v), args.runs)
                                  for case, v in cases.items()}
                if args.gradio_client:
                    from gradio_client import Client, handle_file

                    client = Client(url, verbose=False)
                    call = lambda v: client.predict(handle_file(args.image), v, api_name="/predict")  # noqa: E731
                    levels["gradio_client"] = {case: timed(lambda v=v: call(v), args.runs) for case, v in cases.items()}
            results["engines"][name] = {"levels": levels, "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        if url:
            app.demo.close()
    results["loadavg_1_5_15"]["after"] = [round(x, 2) for x in os.getloadavg()]

    print(f"torch threads {results['torch_threads']}, {results['cpu_count']} CPUs, {args.runs} timed calls per case, "
          f"load average {results['loadavg_1_5_15']['before']} before, {results['loadavg_1_5_15']['after']} after")
    print(f"{'engine':<12} {'level':<13} {'case':<12} {'batch':>5} {'p50 ms':>8} {'p95 ms':>8} {'p50 / one':>10} "
          f"{'CPU ms p50':>11}")
    for engine, by_level in results["engines"].items():
        for level, by_case in by_level["levels"].items():
            base = by_case["one variant"]["p50"]
            for name, r in by_case.items():
                r["ratio_p50"] = r["p50"] / base
                print(f"{engine:<12} {level:<13} {name:<12} {1 + len(cases[name]):>5} {1000 * r['p50']:>8.1f} "
                      f"{1000 * r['p95']:>8.1f} {r['ratio_p50']:>9.2f}x {1000 * r['cpu_p50']:>11.1f}")
            ok = by_case["default"]["ratio_p50"] <= 1.3 and by_case["default"]["p50"] <= 0.25
            print(f"{engine:<12} {level:<13} goal (default <= 1.3x one variant, p50 <= 0.25 s): {'met' if ok else 'NOT met'}")
        all_p50 = by_level["levels"]["predictor"]["all"]["p50"]
        print(f"{engine:<12} predictor     goal (all variants p50 <= 20 ms, issue 14): "
              f"{'met' if all_p50 <= 0.020 else 'NOT met'} ({1000 * all_p50:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
