"""Server memory under oversized request bodies (issue 21): does a handful of big POSTs grow the app?

    python benchmarks/request_memory.py [--requests 50] [--mb 30] [--settle 30] [--app app.py]

Starts ``python APP --port P`` as its own process, reads its resident memory (VmRSS) once it
answers, then sends ``--requests`` bodies of ``--mb`` MB through each of ``/gradio_api/queue/join``
and ``/gradio_api/call/predict``, each in a fresh session: half carry the image as a ``data:`` URL,
half a giant variant string. After each it asks for the session's deep link (which writes the
session's values to disk). It then waits ``--settle`` seconds and reads VmRSS again. Prints and
writes JSON (``--output``, default under runs/). Sends traffic to 127.0.0.1 only; bounded count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}")
        try:
            if httpx.get(url + "config", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the app did not answer")


def send(http: httpx.Client, route: str, body: bytes) -> str:
    """POST a pre-serialized JSON body; the status, or how the connection ended."""
    try:
        r = http.post(route, content=body, headers={"content-type": "application/json"})
        return str(r.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50, help="requests per route")
    p.add_argument("--mb", type=float, default=30, help="size of each body in MB")
    p.add_argument("--settle", type=float, default=30, help="seconds to wait before the last reading")
    p.add_argument("--app", default=str(ROOT / "app.py"), help="the app to start (another checkout's app.py for a before)")
    p.add_argument("--output", default=str(Path("runs") / "request_memory" / "request_memory.json"))
    args = p.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "CIFAR_TRANSFER_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, args.app, "--port", str(port)], cwd=Path(args.app).parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(url, proc)
        with httpx.Client(base_url=url, timeout=120) as http:
            predict = next(i for i, d in enumerate(http.get("config").json()["dependencies"]) if d.get("api_name") == "predict")
            time.sleep(5)
            before = rss_mb(proc.pid)
            filler = "A" * int(args.mb * 2**20)
            statuses: dict[str, dict[str, int]] = {}
            start = time.time()
            for i in range(args.requests):
                data = ([{"path": "x.png", "url": "data:image/png;base64," + filler}, []] if i % 2 == 0 else
                        [{"path": str(ROOT / "examples" / "cat_cifar10-test-00.png")}, [filler]])
                for route in ("gradio_api/queue/join", "gradio_api/call/predict"):
                    session = uuid.uuid4().hex
                    body = json.dumps({"data": data, "fn_index": predict, "session_hash": session,
                                       "event_data": None, "trigger_id": None}).encode()
                    status = send(http, route, body)
                    statuses.setdefault(route, {}).setdefault(status, 0)
                    statuses[route][status] += 1
                    try:
                        http.get("gradio_api/deep_link", params={"session_hash": session})
                    except httpx.HTTPError:
                        pass
            sent_s = time.time() - start
            peak_after_send = rss_mb(proc.pid)
            time.sleep(args.settle)
            after = rss_mb(proc.pid)
            alive = http.get("config").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    report = {"requests_per_route": args.requests, "body_mb": args.mb, "settle_s": args.settle, "app": args.app,
              "rss_before_mb": round(before, 1), "rss_after_send_mb": round(peak_after_send, 1),
              "rss_after_settle_mb": round(after, 1), "growth_mb": round(after - before, 1),
              "statuses": statuses, "send_s": round(sent_s, 1), "server_alive": alive,
              "load_average": os.getloadavg()}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
