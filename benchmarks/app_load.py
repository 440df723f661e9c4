"""Load test: many concurrent gradio_client clients against the app on 127.0.0.1.

    python benchmarks/app_load.py [--clients 32] [--requests 10] [--url http://127.0.0.1:7860/]

Without ``--url`` the app is started as a separate process (``python app.py``
on 127.0.0.1, a free port; the clients' threads would otherwise compete with
the server for this process's GIL) and stopped at the end.
Each client sends its requests one after another (examples in turn, default
variants); all clients run at once. Reports errors and p50/p95 latency; exits
with status 1 if any request failed. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.app_latency import percentiles  # noqa: E402


def run_client(url: str, images: list[Path], requests: int, offset: int) -> tuple[list[float], list[str]]:
    from gradio_client import Client, handle_file

    latencies, errors = [], []
    try:
        client = Client(url, verbose=False)
    except Exception as exc:  # noqa: BLE001 - counted, not raised
        return [], [f"connect: {type(exc).__name__}: {exc}"] * requests
    for i in range(requests):
        image = images[(offset + i) % len(images)]
        t0 = time.perf_counter()
        try:
            result = client.predict(handle_file(str(image)), api_name="/predict")
            if not result or result["variants"][0]["key"] != "correct":
                raise ValueError(f"unexpected answer: {str(result)[:200]}")
            latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    return latencies, errors


def start_app(timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on 127.0.0.1 and a free port; returns the process and its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the app exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"error: the app did not answer on {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--url", help="a running app on 127.0.0.1 / localhost (default: start one here)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    images = sorted((ROOT / "examples").glob("*.png"))
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("error: the load test only targets a local app (127.0.0.1)")
        url = args.url
    else:
        proc, url = start_app()
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [pool.submit(run_client, url, images, args.requests, c) for c in range(args.clients)]
            outcomes = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    latencies = [x for lat, _ in outcomes for x in lat]
    errors = [e for _, errs in outcomes for e in errs]
    total = args.clients * args.requests
    result = {"clients": args.clients, "requests_per_client": args.requests, "requests": total,
              "errors": len(errors), "wall_s": wall, "throughput_rps": len(latencies) / wall,
              "latency_s": percentiles(latencies) if latencies else None, "first_errors": errors[:5]}
    print(f"{args.clients} clients x {args.requests} requests = {total}: {len(errors)} errors, "
          f"{wall:.1f} s wall, {result['throughput_rps']:.1f} requests/s")
    if latencies:
        lat = result["latency_s"]
        print(f"latency p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, mean {lat['mean']:.2f} s, "
              f"max {max(latencies):.2f} s")
    for e in errors[:5]:
        print("error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if errors:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
