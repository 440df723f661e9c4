"""Load test: many concurrent gradio_client clients, and aborted uploads, against the app on 127.0.0.1.

    python benchmarks/app_load.py [--clients 32] [--requests 10] [--engine onnxruntime pytorch]
    python benchmarks/app_load.py [--clients 32] [--requests 10] [--url http://127.0.0.1:7860/]
    python benchmarks/app_load.py --clients 4 --requests 10 --aborted 20 --aborted-mb 20 \\
        --partial-age-s 30 --sweep-s 10 --name aborted-janitor

Without ``--url`` the app is started as a separate process (``python app.py``
on 127.0.0.1, a free port; the clients' threads would otherwise compete with
the server for this process's GIL) with its own fresh, empty upload folder
(``GRADIO_TEMP_DIR``, a temp dir removed at the end), and stopped at the end.
Each client sends its requests one after another (examples in turn, default
variants); all clients run at once.

``--engine`` picks the inference engine of the app it starts (``auto``,
``onnxruntime``, ``pytorch``; see ``cifar_transfer/engine.py``): app.py has no
switch for it, so the app is started through a small launcher that passes
``engine=`` to the ``Predictor`` app.py builds and prints the engine actually
used (``auto`` and a failed ONNX export fall back to PyTorch), then runs app.py
as ``__main__``. Several engines run back to back in one invocation, each
against a fresh app, and each writes ``<out-dir>/<name>-<engine>.json``.
Without ``--engine`` the app starts as ``python app.py`` and the file is
``<name>.json``.
``--ort-spin`` starts the app with ``CIFAR_TRANSFER_ORT_SPIN=1``: ONNX Runtime's intra-op threads spin-wait
for work, as they did by default before issue 14 turned it off (``cifar_transfer/engine.py``); the file gets
``-spin``.
Before the timed load one client sends ``--warmup`` requests (default 3, not
counted): the first requests import lazily loaded modules and start threads.

``--aborted N`` adds, at the same time, N clients that each start a multipart
``POST /gradio_api/upload`` declaring an ``--aborted-mb`` MB file, send
``--aborted-sent`` of the body over a raw socket and then reset the
connection (what a visitor's dropped connection does). Gradio streams each
upload into a ``tmp*`` file at the top of its upload folder and keeps it when
the upload breaks off; the app's upload janitor (``cifar_transfer.uploads``)
removes it after ``CIFAR_TRANSFER_PARTIAL_UPLOAD_AGE_S``. The janitor's
settings can be passed through (``--partial-age-s``, ``--upload-age-s``,
``--max-mb``, ``--sweep-s``; unset = the app's defaults) so that a short run
shows it at work.

Reports errors, p50/p95 latency and requests/s, and the upload folder's size
and file count and the server's RSS (``VmRSS`` in ``/proc/PID/status``) at
three points: before the load, right after it, and after ``--wait-s`` (by
default, when aborted uploads were sent: one sweep past the partial age).
Prints a JSON summary and writes it to ``<out-dir>/<name>.json`` (atomically; ``--out-dir``
defaults to ``runs/app_load``: the docs' files are in ``results/app_load``, pass that to add to
them). Exits with status 1 if any normal request failed. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.app_latency import percentiles  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIB = 2**20


def run_client(url: str, images: list[Path], requests: int, offset: int,
               timeout: float | None = None) -> tuple[list[float], list[str]]:
    from gradio_client import Client, handle_file

    latencies, errors = [], []
    try:
        client = Client(url, verbose=False, httpx_kwargs={"timeout": timeout} if timeout else None)
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


def aborted_upload(url: str, megabytes: float, fraction: float, index: int) -> dict:
    """Start a multipart upload of ``megabytes`` MB, send ``fraction`` of the body, then reset the connection.

    Returns the bytes sent, or the error that stopped the client earlier (a server that refused the
    upload, closed first, ...). The data is incompressible-looking but cheap: a repeated 1 MiB block.
    """
    parts = urlparse(url)
    boundary = f"----app-load-aborted-{index}-{os.getpid()}"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big-{index}.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = int(megabytes * MIB)
    body_len = len(head) + size + len(tail)
    to_send = max(len(head) + 1, int(body_len * fraction))
    request = (f"POST {parts.path.rstrip('/')}/gradio_api/upload HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {body_len}\r\n"
               "Connection: close\r\n\r\n").encode()
    block = os.urandom(MIB)
    sent = 0
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=60) as s:
            s.sendall(request + head)
            sent = len(head)
            while sent < to_send:
                chunk = block[: min(len(block), to_send - sent)]
                s.sendall(chunk)
                sent += len(chunk)
            time.sleep(0.5)  # let the server read what arrived, so the partial file holds it
            # Abrupt close: SO_LINGER 0 sends a TCP RST instead of a FIN, as a dropped connection would.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        return {"sent_bytes": sent, "error": None}
    except OSError as exc:
        return {"sent_bytes": sent, "error": f"{type(exc).__name__}: {exc}"}


def folder_usage(folder: Path | None) -> dict | None:
    """Bytes (apparent size) and files under ``folder``; ``partial_*``: Gradio's ``tmp*`` files at its top."""
    if folder is None:
        return None
    total = files = partial = partial_bytes = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total, files = total + st.st_size, files + 1
            if dirpath == str(folder) and name.startswith("tmp"):
                partial, partial_bytes = partial + 1, partial_bytes + st.st_size
    return {"bytes": total, "mib": round(total / MIB, 2), "files": files,
            "partial_files": partial, "partial_mib": round(partial_bytes / MIB, 2)}


def process_memory(pid: int | None) -> dict | None:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MiB, from ``/proc/PID/status``."""
    if pid is None:
        return None
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[{"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}[key]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return None
    return out


def snapshot(folder: Path | None, pid: int | None) -> dict:
    return {"upload_folder": folder_usage(folder), "server": process_memory(pid)}


ENGINES = ("auto", "onnxruntime", "pytorch")

# Runs app.py as __main__ with ``engine=`` passed to the Predictor it builds (app.py has no engine switch),
# and prints the engine the predictor ended up with.
LAUNCHER = r"""
import os, runpy, sys
engine, app_path = sys.argv[1], sys.argv[2]
sys.argv = [app_path, *sys.argv[3:]]
from cifar_transfer import predictor
init = predictor.Predictor.__init__
def __init__(self, *args, **kwargs):
    kwargs.setdefault("engine", engine)
    init(self, *args, **kwargs)
    print(f"app_load: engine requested={engine} used={self.engine.name}", flush=True)
predictor.Predictor.__init__ = __init__
runpy.run_path(app_path, run_name="__main__")
"""


def app_command(port: int, engine: str | None = None) -> list[str]:
    """``python app.py --host 127.0.0.1 --port PORT``, through :data:`LAUNCHER` when ``engine`` is given."""
    tail = ["--host", "127.0.0.1", "--port", str(port)]
    if engine is None:
        return [sys.executable, str(ROOT / "app.py"), *tail]
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    return [sys.executable, "-c", LAUNCHER, engine, str(ROOT / "app.py"), *tail]


def engine_used(log_path: Path) -> str | None:
    """The engine the launched app's predictor runs on, from its log (``None``: not started through the launcher)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("app_load: engine requested="):
            return line.rsplit("used=", 1)[1].strip()
    return None


def start_app(env: dict[str, str], log_path: Path, timeout: float = 300.0,
              engine: str | None = None) -> tuple[subprocess.Popen, str]:
    """``python app.py`` on 127.0.0.1 and a free port; returns the process and its URL once it answers.

    The server's output goes to ``log_path`` (a pipe nobody reads would fill up and stall the server).
    ``engine``: start it through :data:`LAUNCHER` with that inference engine.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(app_command(port, engine), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the app exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"error: the app did not answer on {url} within {timeout:.0f} s")


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def janitor_env(args) -> dict[str, str]:
    """The app's upload-janitor settings given on the command line, as its environment variables."""
    pairs = {"CIFAR_TRANSFER_PARTIAL_UPLOAD_AGE_S": args.partial_age_s, "CIFAR_TRANSFER_UPLOAD_AGE_S": args.upload_age_s,
             "CIFAR_TRANSFER_UPLOAD_MAX_MB": args.max_mb, "CIFAR_TRANSFER_UPLOAD_SWEEP_S": args.sweep_s}
    return {k: repr(v) for k, v in pairs.items() if v is not None}


def describe(label: str, snap: dict) -> str:
    folder, server = snap["upload_folder"], snap["server"]
    words = []
    if folder is not None:
        words.append(f"upload folder {folder['mib']:.1f} MiB in {folder['files']} files "
                     f"({folder['partial_files']} partial, {folder['partial_mib']:.1f} MiB)")
    if server:
        words.append(f"server RSS {server.get('rss_mib', float('nan')):.0f} MiB")
    return f"{label:>12}: " + "; ".join(words)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent gradio_client clients (default 32; e.g. 64)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default 10)")
    p.add_argument("--client-timeout", type=float,
                   help="gradio_client's HTTP timeout in seconds (default: its own, 20 s; a request queued "
                        "longer than that counts as an error, ReadTimeout)")
    p.add_argument("--aborted", type=int, default=0, help="clients that break off an upload (default 0)")
    p.add_argument("--aborted-mb", type=float, default=20.0, help="declared size of each aborted upload, MiB (default 20)")
    p.add_argument("--aborted-sent", type=float, default=0.95,
                   help="fraction of each aborted upload's body sent before the connection is reset (default 0.95)")
    p.add_argument("--partial-age-s", type=float, help="app: $CIFAR_TRANSFER_PARTIAL_UPLOAD_AGE_S (default 600)")
    p.add_argument("--upload-age-s", type=float, help="app: $CIFAR_TRANSFER_UPLOAD_AGE_S (default 21600)")
    p.add_argument("--max-mb", type=float, help="app: $CIFAR_TRANSFER_UPLOAD_MAX_MB (default 1024)")
    p.add_argument("--sweep-s", type=float, help="app: $CIFAR_TRANSFER_UPLOAD_SWEEP_S (default 60)")
    p.add_argument("--wait-s", type=float,
                   help="seconds to wait after the load before the last measurement; default: with --aborted, "
                        "partial age + sweep period + 5 s (one sweep past the partial age), else 0")
    p.add_argument("--url", help="a running app on 127.0.0.1 / localhost (default: start one here)")
    p.add_argument("--upload-dir", help="with --url: that app's upload folder, to measure it")
    p.add_argument("--pid", type=int, help="with --url: that app's process id, to read its RSS")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "app_load"), metavar="DIR",
                   help="folder of the JSON files; default: runs/app_load (the docs' are in results/app_load: pass that to "
                        "add to them)")
    p.add_argument("--name", help="OUT_DIR/<name>.json (default: from the settings, e.g. c32x10)")
    p.add_argument("--engine", nargs="+", choices=ENGINES,
                   help="inference engine(s) of the app it starts, run back to back (e.g. onnxruntime pytorch); "
                        "each writes OUT_DIR/<name>-<engine>.json (default: app.py as is, <name>.json)")
    p.add_argument("--warmup", type=int, default=3,
                   help="requests one client sends before the timed load (not counted; default 3, 0: none)")
    p.add_argument("--ort-spin", action="store_true",
                   help="start the app with CIFAR_TRANSFER_ORT_SPIN=1: ONNX Runtime's threads spin-wait for work "
                        "(off by default since issue 14; cifar_transfer/engine.py)")
    p.add_argument("--json", help="also write the results here (several engines: a list)")
    return p


def main(argv: list[str] | None = None) -> dict | list[dict]:
    args = get_parser().parse_args(argv)
    if args.engine and args.url:
        raise SystemExit("error: --engine starts the app itself; it does not go with --url")
    if args.ort_spin and args.url:
        raise SystemExit("error: --ort-spin sets the environment of the app it starts; it does not go with --url")
    results = [run(args, engine, out_dir=Path(args.out_dir)) for engine in (args.engine or [None])]
    if len(results) > 1:
        print(f"{'engine':<12} {'requests/s':>10} {'p50 s':>7} {'p95 s':>7} {'errors':>7}  load average before/after")
        for r in results:
            lat = r["latency_s"] or {}
            print(f"{r['engine']['used'] or '?':<12} {r['throughput_rps'] or 0:>10.2f} {lat.get('p50', float('nan')):>7.2f} "
                  f"{lat.get('p95', float('nan')):>7.2f} {r['errors']:>7}  {r['loadavg_1m']['before']:.2f} / "
                  f"{r['loadavg_1m']['after_load']:.2f}")
    if args.json:
        write_json_atomic(Path(args.json), results[0] if len(results) == 1 else results)
    if any(r["errors"] for r in results):
        raise SystemExit(1)
    return results[0] if len(results) == 1 else results


def run(args, engine: str | None = None, on_load_start=None, on_load_end=None,
        out_dir: Path | None = None) -> dict:
    """One load run against a fresh app (``engine``: through the launcher) or ``args.url``; writes its JSON.

    ``on_load_start(pid)`` / ``on_load_end(pid)``, when given, are called right before the clients start and
    right after they finish (the profiler's hooks, ``benchmarks/app_profile.py``). ``out_dir`` ``None``: write
    no file.
    """
    from cifar_transfer import uploads

    images = sorted((ROOT / "examples").glob("*.png"))
    name = args.name or f"c{args.clients}x{args.requests}" + (f"-aborted{args.aborted}x{args.aborted_mb:g}mb"
                                                                if args.aborted else "")
    if engine is not None:
        name = f"{name}-{engine}" + ("-spin" if args.ort_spin else "")
    partial_age = args.partial_age_s if args.partial_age_s is not None else uploads.PARTIAL_AGE_S
    sweep = args.sweep_s if args.sweep_s is not None else uploads.SWEEP_EVERY_S
    wait = args.wait_s if args.wait_s is not None else (partial_age + sweep + 5 if args.aborted else 0.0)

    proc, tmp_root, folder, pid = None, None, None, args.pid
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit("error: the load test only targets a local app (127.0.0.1)")
        url = args.url
        folder = Path(args.upload_dir).resolve() if args.upload_dir else None
        if janitor_env(args):
            print("note: --url given; the janitor settings on the command line do not reach that app")
    else:
        tmp_root = Path(tempfile.mkdtemp(prefix="app_load-"))
        folder = tmp_root / "gradio"
        folder.mkdir()
        env = {**os.environ, "GRADIO_TEMP_DIR": str(folder), "GRADIO_ANALYTICS_ENABLED": "False", **janitor_env(args)}
        if args.ort_spin:
            env["CIFAR_TRANSFER_ORT_SPIN"] = "1"
        print(f"starting the app (engine: {engine or 'as app.py picks'}) ...", flush=True)
        proc, url = start_app(env, tmp_root / "server.log", engine=engine)
        pid = proc.pid
    used = engine_used(tmp_root / "server.log") if tmp_root is not None and engine is not None else None
    if engine is not None:
        print(f"engine: requested {engine}, used {used}", flush=True)
    try:
        load_before = os.getloadavg()
        before = snapshot(folder, pid)
        print(describe("before", before))
        if args.warmup:  # the first requests import lazily loaded modules and start the worker threads
            warm = run_client(url, images, args.warmup, 0, args.client_timeout)
            if warm[1]:
                print("warm-up errors:", warm[1][:3])
        if on_load_start is not None:
            on_load_start(pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients + args.aborted) as pool:
            futures = [pool.submit(run_client, url, images, args.requests, c, args.client_timeout) for c in range(args.clients)]
            aborted_futures = [pool.submit(aborted_upload, url, args.aborted_mb, args.aborted_sent, i)
                               for i in range(args.aborted)]
            outcomes = [f.result() for f in futures]
            load_wall = time.perf_counter() - t0
            if on_load_end is not None:
                on_load_end(pid)
            aborted = [f.result() for f in aborted_futures]
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        time.sleep(1.0)  # let the server notice the resets and close its files
        after_load = snapshot(folder, pid)
        print(describe("after load", after_load))
        after_wait = None
        if wait > 0:
            print(f"waiting {wait:.0f} s (partial age {partial_age:g} s, sweep every {sweep:g} s) ...", flush=True)
            time.sleep(wait)
            after_wait = snapshot(folder, pid)
            print(describe(f"after {wait:.0f} s", after_wait))
        server_alive = proc.poll() is None if proc is not None else None
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)

    latencies = [x for lat, _ in outcomes for x in lat]
    errors = [e for _, errs in outcomes for e in errs]
    total = args.clients * args.requests
    result = {
        "name": name, "engine": {"requested": engine, "used": used},
        "ort_allow_spinning": "1" if args.ort_spin else os.environ.get("CIFAR_TRANSFER_ORT_SPIN", "0"),
        "clients": args.clients, "requests_per_client": args.requests, "requests": total, "warmup_requests": args.warmup,
        "client_timeout_s": args.client_timeout or 20,
        "errors": len(errors), "wall_s": round(wall, 2), "load_wall_s": round(load_wall, 2),
        "throughput_rps": len(latencies) / load_wall if load_wall else None,
        "latency_s": percentiles(latencies) | {"max": max(latencies)} if latencies else None,
        "error_kinds": dict(Counter(e.split(":")[0] for e in errors)), "first_errors": errors[:5],
        # 1-minute load average of the machine before and right after the load (2 cores: above ~2 + the
        # benchmark's own share means other work competed for the CPU and the speed numbers are pessimistic)
        "loadavg_1m": {"before": round(load_before[0], 2), "after_load": round(load_after[0], 2)},
        "loadavg_1_5_15": {"before": [round(x, 2) for x in load_before], "after_load": [round(x, 2) for x in load_after]},
        "cpus": os.cpu_count(),
        "aborted": {"uploads": args.aborted, "declared_mb": args.aborted_mb, "sent_fraction": args.aborted_sent,
                    "sent_mib": round(sum(a["sent_bytes"] for a in aborted) / MIB, 2),
                    "client_errors": [a["error"] for a in aborted if a["error"]][:5]},
        "janitor": {"partial_age_s": partial_age, "sweep_s": sweep,
                    "upload_age_s": args.upload_age_s if args.upload_age_s is not None else uploads.UPLOAD_AGE_S,
                    "max_mb": args.max_mb if args.max_mb is not None else uploads.MAX_BYTES / MIB,
                    "env": janitor_env(args)} if not args.url else None,
        "wait_s": wait, "server_alive_at_end": server_alive,
        "before": before, "after_load": after_load, "after_wait": after_wait,
    }
    print(f"{args.clients} clients x {args.requests} requests = {total}: {len(errors)} errors, "
          f"{load_wall:.1f} s, {result['throughput_rps']:.1f} requests/s "
          f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, {os.cpu_count()} CPUs)"
          + (f"; {args.aborted} aborted uploads of {args.aborted_mb:g} MB ({result['aborted']['sent_mib']:.0f} MiB sent)"
             if args.aborted else ""))
    if latencies:
        lat = result["latency_s"]
        print(f"latency p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, mean {lat['mean']:.2f} s, "
              f"max {lat['max']:.2f} s")
    for e in errors[:5]:
        print("error:", e)
    print(json.dumps(result, indent=2))
    if out_dir is not None:
        out = Path(out_dir) / f"{name}.json"
        write_json_atomic(out, result)
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return result


if __name__ == "__main__":
    main()
