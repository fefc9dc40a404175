"""Load on the web app: concurrent API clients, each sending Maps requests, on the bundled model.

    python benchmarks/app_load.py            # 10 rounds of 8 new clients x 3 requests, the model's own steps
    python benchmarks/app_load.py --quick    # 6 rounds at 5 steps, the server keeping 8 sessions (under 5 minutes)

The app runs as its own process (``attnkit app`` on 127.0.0.1; its one queue serialises the pipeline) and only
its memory is measured; every client is a gradio_client.Client in its own thread of this process. A request is
answered correctly when its word list is the prompt's words and its record.json names its own prompt and seed.
Prints a table and one JSON line: requests, answered, correct, lost, seconds, rss_mb_before (after one warm-up
request), rss_mb_after (after each round), rss_growth_first_round_mb, rss_growth_later_rounds_mb,
rss_growth_once_full_mb (what the rounds after the server's session store is full still add; the store holds
``--max-sessions``, the app's default 64, and each client is a new session) and rss_mb_per_round_once_full (a
least-squares slope over those rounds, steadier than two noisy end points). Memory is flat when those are ~0:
until the store is full every new session adds gradio's copy of the page's configuration (about 2.5 MB, ~20 MB
per round of 8).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a grey background", "a yellow diamond on a white background"]
PLACES = ["down", "mid", "up"]
# A busy 2-core server can take longer than httpx's 5 s to send eight new clients the page config at once.
HTTPX = {"timeout": 120.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="load rounds (default 10, quick 6)")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="sessions the server keeps (default the app's own, quick 8)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 25)
    args.rounds = args.rounds or (6 if args.quick else 10)
    from attnkit.app.server import MAX_SESSIONS

    max_sessions = args.max_sessions or (8 if args.quick else MAX_SESSIONS)
    from gradio_client import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The server is its own process, started as a user starts it, so its memory is the server's alone (the
    # clients, each with its threads and connections, stay in this process).
    out = tempfile.mkdtemp()
    # The server's log (progress bars included) goes to a file: a pipe nobody drains fills up after a few rounds
    # and blocks the server in mid-run.
    log = open(Path(out) / "server.log", "w+")  # noqa: SIM115 - closed with the server below
    command = [sys.executable, "-m", "attnkit", "app", "--port", str(port), "--out", out, "--threads", "1", "--quiet",
               "--max-sessions", str(max_sessions)]
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=log, text=True)
    try:
        _wait_for_port(port, server, log)
        url = f"http://127.0.0.1:{port}/"
        process = psutil.Process(server.pid)
        Client(url, verbose=False, httpx_kwargs=HTTPX).predict(PROMPTS[0], 0, steps, 2.5, "16", PLACES, 0, 1, api_name="/maps")
        rss_before = process.memory_info().rss / 2**20
        rounds = []
        for round_index in range(args.rounds):
            outcomes, seconds = load_round(url, args.clients, args.requests, steps, seed_base=1000 * round_index)
            rounds.append((outcomes, seconds, process.memory_info().rss / 2**20))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    total = args.clients * args.requests
    print(f"{args.clients} clients x {args.requests} Maps requests per round, {args.rounds} rounds, bundled model, "
          f"{steps} steps, one thread, the server keeping {max_sessions} sessions; server RSS after one warm-up "
          f"request: {rss_before:.0f} MB\n")
    print("| round | requests | answered | correct | lost | seconds | median latency s | max latency s | server RSS "
          "MB after |\n|---|---|---|---|---|---|---|---|---|")
    for k, (outcomes, seconds, rss) in enumerate(rounds, start=1):
        latencies = sorted(s for *_, s in outcomes)
        print(f"| {k} | {total} | {len(outcomes)} | {sum(ok for *_, ok, _ in outcomes)} | {total - len(outcomes)} | "
              f"{seconds:.1f} | {latencies[len(latencies) // 2]:.1f} | {latencies[-1]:.1f} | {rss:.0f} |")
    answered = sum(len(o) for o, _, _ in rounds)
    # The session store is full after the round whose clients (plus the warm-up's one session) reach its size;
    # from then on every new session pushes an old one out, so what is still added is a leak.
    full = min(args.rounds, -(-(max_sessions - 1) // args.clients)) - 1
    print(json.dumps({"requests": total * args.rounds, "answered": answered,
                      "correct": sum(ok for o, _, _ in rounds for *_, ok, _ in o),
                      "lost": total * args.rounds - answered, "seconds": round(sum(s for _, s, _ in rounds), 1),
                      "rss_mb_before": round(rss_before), "rss_mb_after": [round(r) for *_, r in rounds],
                      "rss_growth_first_round_mb": round(rounds[0][2] - rss_before),
                      "rss_growth_later_rounds_mb": round(rounds[-1][2] - rounds[0][2]),
                      "max_sessions": max_sessions, "store_full_after_round": full + 1,
                      "rss_growth_once_full_mb": round(rounds[-1][2] - rounds[full][2]),
                      "rss_mb_per_round_once_full": round(_slope([r for *_, r in rounds[full:]]), 1)}))


def _slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def _wait_for_port(port: int, server: subprocess.Popen, log: Any, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"attnkit app exited ({server.returncode}): {Path(log.name).read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"attnkit app did not listen on port {port} within {timeout:.0f} s")


def load_round(url: str, clients: int, requests: int, steps: int, seed_base: int
               ) -> tuple[list[tuple[int, int, bool, float]], float]:
    """``clients`` concurrent API clients, ``requests`` Maps requests each; per request (client, index, answered
    correctly, seconds), and the round's wall time."""
    from gradio_client import Client

    outcomes: list[tuple[int, int, bool, float]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        api = Client(url, verbose=False, httpx_kwargs=HTTPX)
        for r in range(requests):
            prompt, seed = PROMPTS[(index + r) % len(PROMPTS)], seed_base + index * 100 + r
            start = time.perf_counter()
            try:
                _, words, files, _ = api.predict(prompt, seed, steps, 2.5, "16", PLACES, 0, 1, api_name="/maps")
                record = json.loads(Path(next(f for f in files if f.endswith("record.json"))).read_text())
                ok = ([w["caption"] for w in words] == list(dict.fromkeys(prompt.split()))
                      and record["prompt"] == prompt and record["seed"] == seed)
            except Exception:  # noqa: BLE001 - a failed request counts as answered wrongly
                ok = False
            with lock:
                outcomes.append((index, r, ok, time.perf_counter() - start))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - start

if __name__ == "__main__":
    main()
