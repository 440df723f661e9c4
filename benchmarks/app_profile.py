"""Where the app's server CPU goes under load: py-spy on the app while ``app_load``'s clients run.

    python benchmarks/app_profile.py [--engine onnxruntime] [--clients 32] [--requests 10] [--rate 100]

Starts the app as ``benchmarks/app_load.py --engine`` does (its own process, a fresh upload
folder), and while the clients run:

* reads every thread's CPU time of the server (``/proc/PID/task/TID/stat``) right before and right
  after the load: the exact CPU seconds per thread;
* attaches ``py-spy record --pid PID --threads --nonblocking`` (``pip install py-spy``; sampling,
  so the server runs unmodified) for the same window: which Python code each thread was running.

Each Python thread's measured CPU is split by its own non-idle samples into: the model's forward
pass (``cifar_transfer/engine.py``), image decoding (``cifar_transfer/images.py``), PNG encoding
(Gradio's ``save_img_array_to_cache``/PIL's PNG plugin), JSON and serialization (``to_dict``,
``json``/``orjson`` dumps, Gradio's ``postprocess``/``model_dump``), upload and cache file handling
(multipart parsing, hashing, copies into Gradio's cache), the predictor's other work (input
transforms, meter, display pictures), and the rest: Gradio's queue, HTTP server, event loop.
Threads without Python frames (ONNX Runtime's or PyTorch's worker threads) are their own row:
they only run inside the forward pass (PyTorch's also inside the predictor's tensor work), and
ONNX Runtime's spin-wait for work only with ``--ort-spin`` (off by default since issue 14), and then their CPU includes that spinning. Samples whose
innermost frame waits (the event loop's epoll, ``Condition.wait``, ...; see ``WAITING``) are
dropped first. The rest row names Gradio's larger parts (``GRADIO_PARTS``).
``--resplit results/app_profile/X.json`` recomputes a saved profile's split from its ``.txt``.

Also times, in process, what the page's second step (``render``) adds per request and the API
call does not: each panel's picture written as PNG into Gradio's cache
(``processing_utils.save_img_array_to_cache``, PIL's default compression), for the default four
panels, against PIL's fastest PNG compression.

Writes ``<out-dir>/<name>-<engine>.json`` (and the raw py-spy stacks beside it, ``.txt``; ``--out-dir``
defaults to ``runs/app_profile``; the committed ones in ``results/app_profile`` are gzipped, ``.txt.gz``,
which ``--resplit`` reads too).
The clients' own CPU (gradio_client, 32 threads in this process) is not the server's and is not
counted; it competes with the server for the same cores, so requests/s here are below a run
without the profiler: take throughput from ``benchmarks/app_load.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import app_load  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

# (category, test on one frame "function (file:line)"), first match from the innermost frame outwards wins
# for the first four; see categorize().
MODEL = "model forward (engine.py)"
DECODE = "image decoding (images.py)"
PNG = "PNG encoding"
JSON = "JSON / serialization"
UPLOAD = "upload and cache files"
PREDICTOR = "predictor's other work (transforms, meter, pictures)"
OTHER = "Gradio queue, HTTP, event loop, other"
NATIVE = "native worker threads (ONNX Runtime / PyTorch pools)"
CATEGORIES = [MODEL, NATIVE, DECODE, PNG, JSON, UPLOAD, PREDICTOR, OTHER]


# Leaf functions where a thread waits rather than computes (py-spy's idle detection misses some of them with
# --nonblocking, e.g. the event loop's epoll): such samples are dropped before a thread's CPU is split by them.
WAITING = {"EpollSelector.select", "PollSelector.select", "Condition.wait", "Event.wait", "Thread._wait_for_tstate_lock",
           "Queue.get", "Blocks.block_thread", "sleep"}
# Gradio's own work worth naming inside the "queue, HTTP, other" row: (label, a function on the stack)
GRADIO_PARTS = [("GET /config (each client's connect)", "App.create_app.<locals>.get_config"),
                ("a new session's state (SessionState)", "SessionState.__init__"),
                ("queue analytics summary (pandas)", "Queue.compute_analytics_summary"),
                ("deepcopy (state, payloads)", "deepcopy"),
                ("socket writes (responses, SSE)", "_SelectorSocketTransport.write"),
                ("handing calls to worker threads (anyio)", "run_sync_in_worker_thread"),
                ("HTTP routing and middleware (Starlette, FastAPI)", "RequestResponseCycle.run_asgi")]


def waiting(stack: tuple[str, ...]) -> bool:
    return bool(stack) and stack[-1].split(" (", 1)[0] in WAITING


def gradio_part(frames) -> str:
    names = [f.split(" (", 1)[0] for f in frames]
    for label, marker in GRADIO_PARTS:
        if any(n == marker or n.endswith("." + marker) for n in names):
            return label
    return "rest"


def categorize(frames: list[str]) -> str:
    """The category of one sampled stack (outermost frame first, as py-spy's raw format gives it)."""
    joined = ";".join(frames)
    if "cifar_transfer/engine.py" in joined or "(engine.py:" in joined:
        return MODEL
    if "cifar_transfer/images.py" in joined or "(images.py:" in joined:
        return DECODE
    if any(k in joined for k in ("save_img_array_to_cache", "save_pil_to_cache", "PngImagePlugin")):
        return PNG
    for frame in reversed(frames):  # innermost first: serialization inside the predictor counts as JSON
        func = frame.split(" (", 1)[0]
        where = frame.rsplit("(", 1)[-1]
        if (func.endswith("to_dict") or "dumps" in func or "model_dump" in func or "jsonable" in func
                or "postprocess" in func or "serializ" in func.lower() or where.startswith(("json/", "orjson"))):
            return JSON
        if ("upload" in func.lower() or "multipart" in where.lower() or "MultiPart" in func or "hash_file" in func
                or "move_resource" in func or "move_files_to_cache" in func or "save_file_to_cache" in func
                or where.startswith(("shutil.py", "tempfile.py"))):
            return UPLOAD
    if any(k in joined for k in ("cifar_transfer/predictor.py", "(predictor.py:", "cifar_transfer/meter.py",
                                 "(meter.py:", "cifar_transfer/contract.py", "(contract.py:")):
        return PREDICTOR
    return OTHER


def parse_raw(text: str) -> dict[int, Counter]:
    """py-spy ``--threads -f raw`` lines -> {thread id: Counter({stack tuple: samples})}."""
    out: dict[int, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("thread ("):
            continue
        stack, _, count = line.rpartition(" ")
        head, *frames = stack.split(";")
        tid = int(head[len("thread ("):].split(")", 1)[0])
        if not waiting(tuple(frames)):
            out[tid][tuple(frames)] += int(count)
    return out


def thread_cpu(pid: int) -> dict[int, dict]:
    """{tid: {"cpu_s", "name"}} for every thread of ``pid`` (utime + stime from /proc)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = {"cpu_s": (int(fields[11]) + int(fields[12])) / TICK, "name": name}
    return out


class Profiler:
    """The app_load hooks: per-thread CPU before/after, py-spy attached for the window in between."""

    def __init__(self, raw_path: Path, rate: int, pyspy: str):
        self.raw_path, self.rate, self.pyspy = raw_path, rate, pyspy
        self.before = self.after = None
        self.proc = None
        self.window = None

    def start(self, pid: int) -> None:
        self.proc = subprocess.Popen([self.pyspy, "record", "--pid", str(pid), "--rate", str(self.rate), "--threads",
                                      "--nonblocking", "--format", "raw", "--output", str(self.raw_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # attached before the first request
        self.before = thread_cpu(pid)
        self.window = time.perf_counter()

    def stop(self, pid: int) -> None:
        self.after = thread_cpu(pid)
        self.window = time.perf_counter() - self.window
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        _, err = self.proc.communicate(timeout=60)
        if not self.raw_path.is_file():
            raise SystemExit(f"error: py-spy wrote nothing: {err[-1000:]}")

    def split(self, requests: int) -> dict:
        cpu = {tid: (self.after[tid]["cpu_s"] - self.before.get(tid, {"cpu_s": 0.0})["cpu_s"], self.after[tid]["name"])
               for tid in self.after}
        return split(parse_raw(self.raw_path.read_text()), cpu, requests, self.window)


def split(samples: dict[int, Counter], cpu: dict[int, tuple[float, str]], requests: int, window: float) -> dict:
    """Each thread's CPU seconds split by its own (non-waiting) samples; threads without samples: NATIVE."""
    by_cat: dict[str, float] = defaultdict(float)
    gradio: dict[str, float] = defaultdict(float)
    leaves: dict[str, float] = defaultdict(float)
    threads = []
    for tid, (seconds, name) in sorted(cpu.items(), key=lambda kv: -kv[1][0]):
        stacks = samples.get(tid)
        n = sum(stacks.values()) if stacks else 0
        threads.append({"tid": tid, "name": name, "cpu_s": round(seconds, 3), "samples": n})
        if seconds <= 0:
            continue
        if not n:
            by_cat[NATIVE] += seconds
            continue
        for stack, k in stacks.items():
            share = seconds * k / n
            cat = categorize(list(stack))
            by_cat[cat] += share
            if cat == OTHER:
                gradio[gradio_part(stack)] += share
            leaves[stack[-1] if stack else "?"] += share
    total = sum(by_cat.values())
    row = lambda v: {"cpu_s": round(v, 3), "percent": round(100 * v / total, 1),  # noqa: E731
                     "ms_per_request": round(1000 * v / requests, 2)}
    return {
        "server_cpu_s": round(total, 3), "window_s": round(window, 2),
        "server_cpu_cores": round(total / window, 2) if window else None,
        "cpu_ms_per_request": round(1000 * total / requests, 2),
        "split": {c: row(by_cat.get(c, 0.0)) for c in CATEGORIES},
        "gradio_other_parts": {label: row(v) for label, v in sorted(gradio.items(), key=lambda kv: -kv[1])},
        "top_leaf_frames": [{"frame": f, "percent": round(100 * s / total, 1)}
                            for f, s in sorted(leaves.items(), key=lambda kv: -kv[1])[:25]],
        "threads": threads[:40],
    }


def resplit(json_path: Path) -> dict:
    """Recompute a saved profile's split from its raw stacks (``.txt`` beside it) and recorded thread CPU."""
    saved = json.loads(json_path.read_text())
    cpu = {t["tid"]: (t["cpu_s"], t["name"]) for t in saved["threads"]}
    ok = saved["requests"] - saved["errors"]
    raw = json_path.with_suffix(".txt")
    text = raw.read_text() if raw.is_file() else gzip.decompress(raw.with_suffix(".txt.gz").read_bytes()).decode()
    out = {**saved, **split(parse_raw(text), cpu, ok, saved["window_s"])}
    app_load.write_json_atomic(json_path, out)
    return out


def report(out: dict) -> None:
    print(f"\n{out['name']}: {out['server_cpu_s']:.1f} server CPU s over {out['window_s']:.1f} s "
          f"({out['server_cpu_cores']:.2f} cores), {out['cpu_ms_per_request']:.1f} CPU ms per request; "
          f"load average {out['loadavg_1_5_15']['before']} before, {out['loadavg_1_5_15']['after_load']} after")
    for c, row in out["split"].items():
        print(f"  {c:<55} {row['percent']:>5.1f}%  {row['ms_per_request']:>7.1f} ms/request")
    for c, row in out.get("gradio_other_parts", {}).items():
        print(f"    of which {c:<45} {row['percent']:>5.1f}%  {row['ms_per_request']:>7.1f} ms/request")


def png_cost(runs: int) -> dict:
    """In process: ms to write the default panels' pictures as PNG into Gradio's cache, as ``render`` does."""
    from PIL import Image

    import app
    from gradio import processing_utils

    predictor = app.demo.predictor
    image = str(ROOT / "examples" / "cat_cifar10-test-00.png")
    pictures = [v.seen for v in predictor.predict(image, None).variants]
    cache = Path(tempfile.mkdtemp(prefix="app_profile-png-"))
    try:
        def gradio_png():
            for i, pic in enumerate(pictures):
                # a fresh array each time: Gradio names the file by a hash of its bytes and skips a file that exists
                arr = pic.copy()
                arr[0, 0, 0] ^= (time.perf_counter_ns() + i) & 0xFF
                processing_utils.save_img_array_to_cache(arr, str(cache), format="png")

        def pil_png(level: int) -> float:
            import io
            t0 = time.perf_counter()
            for pic in pictures:
                Image.fromarray(pic).save(io.BytesIO(), format="png", compress_level=level)
            return time.perf_counter() - t0

        gradio_png()
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            gradio_png()
            t.append(time.perf_counter() - t0)
        sizes = {lvl: sum(len(_png_bytes(p, lvl)) for p in pictures) for lvl in (1, 6)}
        return {"panels": len(pictures), "picture_shape": list(pictures[0].shape),
                "gradio_save_img_array_to_cache_ms_p50": round(1000 * sorted(t)[len(t) // 2], 2),
                "pil_compress_level_6_ms_p50": round(1000 * sorted(pil_png(6) for _ in range(runs))[runs // 2], 2),
                "pil_compress_level_1_ms_p50": round(1000 * sorted(pil_png(1) for _ in range(runs))[runs // 2], 2),
                "bytes_level_6": sizes[6], "bytes_level_1": sizes[1], "runs": runs}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        app.demo.close()


def _png_bytes(pic, level: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pic).save(buf, format="png", compress_level=level)
    return buf.getvalue()


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", nargs="+", default=["onnxruntime"], choices=app_load.ENGINES)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "app_profile"), metavar="DIR",
                   help="folder of the JSON and stack files; default: runs/app_profile (the docs' are in "
                        "results/app_profile: pass that to add to them)")
    p.add_argument("--name", default=None, help="OUT_DIR/<name>-<engine>.json (default c<clients>x<requests>)")
    p.add_argument("--png-runs", type=int, default=30, help="timed runs of the in-process PNG measurement (0: skip)")
    p.add_argument("--ort-spin", action="store_true", help="as benchmarks/app_load.py --ort-spin (spinning back on)")
    p.add_argument("--resplit", nargs="+", metavar="JSON",
                   help="only recompute the split of saved profiles (results/app_profile/*.json with their .txt)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_parser().parse_args(argv)
    if args.resplit:
        outs = [resplit(Path(f)) for f in args.resplit]
        for out in outs:
            report(out)
        return outs
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("error: py-spy not found (pip install py-spy)")
    name = args.name or f"c{args.clients}x{args.requests}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for engine in args.engine:
        load_args = app_load.get_parser().parse_args(["--clients", str(args.clients), "--requests", str(args.requests)]
                                                     + (["--ort-spin"] if args.ort_spin else []))
        stem = f"{name}-{engine}" + ("-spin" if args.ort_spin else "")
        prof = Profiler(out_dir / f"{stem}.txt", args.rate, pyspy)
        load = app_load.run(load_args, engine, on_load_start=prof.start, on_load_end=prof.stop, out_dir=None)
        parts = prof.split(load["requests"] - load["errors"])
        out = {"name": stem, "engine": load["engine"], "ort_allow_spinning": load["ort_allow_spinning"],
               "clients": args.clients, "requests": load["requests"],
               "errors": load["errors"], "throughput_rps_while_profiled": load["throughput_rps"],
               "latency_s": load["latency_s"], "loadavg_1_5_15": load["loadavg_1_5_15"], "cpus": os.cpu_count(),
               "py_spy_rate_hz": args.rate, **parts}
        outs.append(out)
        report(out)
        app_load.write_json_atomic(out_dir / f"{stem}.json", out)
    if args.png_runs:
        png = png_cost(args.png_runs)
        print(f"\nPNG (render step, not in the API call): {png}")
        app_load.write_json_atomic(out_dir / "png_encoding.json", {**png, "loadavg_1_5_15": list(os.getloadavg())})
    return outs


if __name__ == "__main__":
    main()
