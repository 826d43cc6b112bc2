"""The web page's server under load: concurrent uploads on loopback, answered or not, how fast.

    python -m imagenet_ddp.bench serve [--clients 1,8,32,64] [--requests 4] [--model resnet18]

Starts `predict.py --serve`'s server (imagenet_ddp/serve.py) on 127.0.0.1, port chosen by the system,
in this process, with a stand-in checkpoint (an untrained --model for ImageNet's 1000 classes at
256/224: the speed of a network does not depend on its weights) unless --checkpoint is given. For
each client count, that many threads each POST --requests times the same 500x375 JPEG to
/api/predict, all starting together; a request is bounded by --timeout. Reported per level: answers
by status (200, 503 busy), failures by kind (connection reset, refused, timeout), p50/p95 latency of
the 200s and images per second. The baseline, run the same way first, is the standard library's
ThreadingHTTPServer settings (listen backlog 5, a thread per connection without bound). Loopback only.
"""

from __future__ import annotations

import http.client
import json
import platform
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from imagenet_ddp.errors import ArgumentParser


def _post(port: int, body: bytes, timeout: float) -> tuple[str, float]:
    """One upload: ('200' | '503' | other status | failure kind, seconds)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/api/predict?topk=5", body, {"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        outcome = str(response.status)
    except ConnectionResetError:
        outcome = "connection reset"
    except ConnectionRefusedError:
        outcome = "connection refused"
    except TimeoutError:
        outcome = "timeout"
    except (http.client.HTTPException, OSError) as e:
        outcome = type(e).__name__
    finally:
        conn.close()
    return outcome, time.perf_counter() - start


def load(port: int, body: bytes, clients: int, requests: int, timeout: float) -> dict:
    """`clients` threads x `requests` uploads each, started together: outcomes and latencies."""
    results: list[tuple[str, float]] = []
    lock, go = threading.Lock(), threading.Barrier(clients)

    def client() -> None:
        go.wait()
        for _ in range(requests):
            outcome = _post(port, body, timeout)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(s for outcome, s in results if outcome == "200")

    def pct(q: float) -> float | None:
        return 1000 * ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None

    return {
        "clients": clients,
        "requests": len(results),
        "outcomes": dict(Counter(outcome for outcome, _ in results)),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "img_per_s": len(ok) / wall,
    }


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m imagenet_ddp.bench serve", description=__doc__)
    p.add_argument("--clients", default="1,8,32,64", help="client counts, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="uploads per client (default 4)")
    p.add_argument("--model", default="resnet18", help="architecture of the stand-in checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint of train_ddp.py instead of the stand-in")
    p.add_argument("--max-concurrent", type=int, default=4, help="the server's prediction slots")
    p.add_argument("--threads", type=int, default=2, help="torch compute threads")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits per request")
    p.add_argument("--no-baseline", action="store_true", help="skip the standard library's settings")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients {args.clients!r}: expected whole numbers like 1,8,32,64")
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_concurrent < 1 or args.timeout <= 0:
        p.error("--clients, --requests and --max-concurrent must be at least 1, --timeout > 0")

    import numpy as np
    import torch

    from imagenet_ddp.bench.predict import _stand_in
    from imagenet_ddp.inference import Classifier
    from imagenet_ddp.serve import BACKLOG, MAX_CONNECTIONS, make_server
    from imagenet_ddp.synth import jpeg_bytes, synth_image

    torch.set_num_threads(args.threads)
    body = jpeg_bytes(synth_image(np.random.default_rng(0), 500, 375), 90)
    setups = [] if args.no_baseline else [("stdlib settings (backlog 5, threads unbounded)", 5, 1 << 30)]
    setups.append((f"serve.py (backlog {BACKLOG}, {MAX_CONNECTIONS} threads)", BACKLOG, MAX_CONNECTIONS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = args.checkpoint or _stand_in(Path(tmp) / "best.pt", args.model)
        clf = Classifier.from_checkpoint(ckpt, device="cpu", precision="fp32")
        for name, backlog, threads in setups:
            server = make_server(
                clf,
                "127.0.0.1",
                0,
                quiet=True,
                backlog=backlog,
                max_connections=threads,
                max_concurrent=args.max_concurrent,
            )
            port = server.server_address[1]
            serving = threading.Thread(target=server.serve_forever, daemon=True)
            serving.start()
            try:
                _post(port, body, args.timeout)  # warm-up: the first forward pass allocates
                for clients in levels:
                    row = {"server": name, **load(port, body, clients, args.requests, args.timeout)}
                    rows.append(row)
                    print(f"  {name}: {clients} clients {json.dumps(row['outcomes'])}", flush=True)
            finally:
                server.shutdown()
                server.server_close()
    arch = clf.architecture["name"]
    print(
        f"\n{arch} on {args.threads} CPU threads, {args.max_concurrent} prediction slots, "
        f"{args.requests} uploads per client, 500x375 JPEG, loopback:"
    )
    print("| server | clients | uploads | 200 | 503 | failed (by kind) | p50 ms | p95 ms | img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out = dict(r["outcomes"])
        ok, busy = out.pop("200", 0), out.pop("503", 0)
        failed = ", ".join(f"{n} {kind}" for kind, n in sorted(out.items())) or "0"
        p50 = f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-"
        p95 = f"{r['p95_ms']:.0f}" if r["p95_ms"] is not None else "-"
        print(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {ok} | {busy} | {failed} | "
            f"{p50} | {p95} | {r['img_per_s']:.1f} |"
        )
    from imagenet_ddp.bench import cpu_name

    print(json.dumps({"model": arch, "machine": cpu_name() or platform.machine(), "rows": rows}))
    return 0
