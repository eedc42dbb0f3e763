"""vitserve beside its peers, under the same load, on the same weights and precision, in one run.

    python -m bench.peers                     # CPU: 640x480 single images at c=1 and c=16
    python -m bench.peers --quick             # c=1 and c=4, 4 s each
    python -m bench.peers --device cuda       # GPU: c=1, 64, 256; LitServe batches 64 with a 5 ms timeout

Peers (bench/peer_apps.py), started here on loopback: a plain FastAPI endpoint around transformers'
ViTForImageClassification, and LitServe with its batching. All servers are up for the whole run and the loads
are interleaved (a change in the machine's load hits them alike); while one is loaded, the others are paused
(SIGSTOP to their process groups, SIGCONT after), so none takes cores from the one measured (LitServe's idle
worker polls its queue every millisecond). `--no-pause-idle` leaves them running.
Ratios are vitserve over each peer: images/s (higher is better for us) and p50 latency (lower is better for us).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import sys
import time

from bench import common
from bench.loadgen import Spawned, free_port, spawn
from bench.server import RawForward, VitServe, median_rows, run_matrix, table_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--shape", default="s16")
    p.add_argument("--compile", default="auto", help="vitserve's --compile")
    p.add_argument("--max-batch-size", type=int, default=None, help="vitserve's and LitServe's (8 CPU, 64 GPU)")
    p.add_argument("--batch-timeout", type=float, default=None, help="LitServe's (0.01 CPU, 0.005 GPU)")
    p.add_argument("--peers", default="fastapi,litserve")
    p.add_argument("--concurrency", default=None, help="default 1,16 on CPU; 1,64,256 on CUDA")
    p.add_argument("--images-per-request", default="1")
    p.add_argument("--sizes", default="640x480")
    p.add_argument("--seconds", type=float, default=15.0, help="per load and round")
    p.add_argument(
        "--rounds", type=int, default=1, help="repeat the interleaved loads; figures are medians over rounds"
    )
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--procs", type=int, default=None)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for vitserve (repeat)")
    p.add_argument("--raw", action="store_true", help="time our forward alone just before and after each of our loads")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="length of each raw window")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument(
        "--pause-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pause the servers not under load (SIGSTOP / SIGCONT)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.concurrency = args.concurrency or "1,4"
        args.seconds = min(args.seconds, 4.0)
    args.concurrency = args.concurrency or ("1,64,256" if cuda else "1,16")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.max_batch_size = args.max_batch_size or (64 if cuda else 8)
    args.batch_timeout = args.batch_timeout if args.batch_timeout is not None else (0.005 if cuda else 0.01)
    args.procs = args.procs or (4 if cuda else 1)
    args.cuda = cuda
    args.endpoint = "/v1/classify?top_k=5"
    return args


class Peer(Spawned):
    """A peer server (bench/peer_apps.py) in a subprocess on loopback."""

    ready_path = "/health"

    def __init__(self, kind: str, weights: str, args: argparse.Namespace, folder):
        self.kind, self.weights, self.args, self.folder = kind, weights, args, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.startup_s = None

    def start(self) -> Peer:
        a = self.args
        cmd = [sys.executable, "-m", "bench.peer_apps", self.kind, "--weights", self.weights, "--shape", a.shape]
        cmd += ["--port", str(self.port), "--device", a.device, "--dtype", a.dtype]
        cmd += ["--max-batch-size", str(a.max_batch_size), "--batch-timeout", str(a.batch_timeout)]
        self.log = str(self.folder / f"{self.kind}.log")
        self._t0 = time.perf_counter()
        self.proc = spawn(cmd, {"PYTHONUNBUFFERED": "1"}, self.log)
        return self


@contextlib.contextmanager
def paused(process_groups: list[int], settle_s: float = 1.0):
    """Stop these servers' process groups (each server is its own session: `loadgen.spawn`) for the block, and
    give them `settle_s` after resuming (timers that fired during the pause, a batch loop catching up) before
    the next load, which may be one of theirs."""
    stopped = []
    try:
        for pgid in process_groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGSTOP)
                stopped.append(pgid)
        yield
    finally:
        for pgid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)
        if stopped:
            time.sleep(settle_s)


def ratios(ours: list[dict], theirs: list[dict], name: str) -> list[dict]:
    key = lambda r: (r["image"], r["images_per_request"], r["concurrency"])  # noqa: E731
    mine = {key(r): r for r in ours}
    out = []
    for r in theirs:
        m = mine.get(key(r))
        if not m or not r["images_per_s"]:
            continue
        out.append(
            {
                "peer": name,
                "image": r["image"],
                "images_per_request": r["images_per_request"],
                "concurrency": r["concurrency"],
                "throughput_ratio": round(m["images_per_s"] / r["images_per_s"], 3),
                "p50_ratio": round(m["latency_ms"]["p50"] / r["latency_ms"]["p50"], 3)
                if r["latency_ms"]["p50"]
                else None,
            }
        )
    return out


def save(result: dict, rows: dict[str, list[dict]], kinds: list[str], args: argparse.Namespace, complete: bool):
    """Fill `result` with the loads finished so far and write it to `args.out`: after every load with
    `"complete": false` (a run killed by its time limit keeps what it finished), and once more at the end."""
    merged = {name: median_rows(r) for name, r in rows.items()}
    result["vitserve"] = merged["vitserve"]
    result["peers"] = {k: merged[k] for k in kinds}
    result["rounds"] = rows if args.rounds > 1 else None
    result["ratios"] = [r for k in kinds for r in ratios(merged["vitserve"], merged[k], k)]
    result["complete"] = complete
    result["env"]["loadavg_end"] = os.getloadavg()
    if complete:
        print(table_rows([r for k in merged for r in merged[k]]))
        cols = ["peer", "image", "images_per_request", "concurrency", "throughput_ratio", "p50_ratio"]
        print("\n" + common.table(result["ratios"], cols))
    common.write_json(result, args.out, echo=complete)
    return result


def main(argv: list[str] | None = None) -> dict:
    common.exit_on_sigterm()
    args = parse_args(argv)
    result = {"bench": "peers", "env": common.environment("cuda" if args.cuda else "cpu"), "args": vars(args)}
    kinds = [k for k in args.peers.split(",") if k]
    rows: dict[str, list[dict]] = {"vitserve": [], **{k: [] for k in kinds}}
    save(result, rows, kinds, args, complete=False)  # a file from the start, even if no server comes up
    # Every server is up for the whole run, paused while another is loaded; each load runs against all of them in
    # turn, so a change in the machine's load during the run hits them alike.
    with contextlib.ExitStack() as stack:
        # start every server at once (start-ups overlap), then wait for each
        ours = VitServe(argparse.Namespace(**vars(args))).start()
        stack.callback(ours.__exit__)
        peers = {}
        for kind in kinds:
            peers[kind] = Peer(kind, str(ours.ckpt), args, ours.folder).start()
            stack.callback(peers[kind].__exit__)
        ours.wait()
        result["startup_s"] = {"vitserve": ours.startup_s}
        servers = [("vitserve", ours.url, args.endpoint, ours.proc.pid)]
        for kind, peer in peers.items():
            try:
                peer.wait()
            except Exception as e:  # a peer that cannot start is reported, and the others still run
                result.setdefault("peer_errors", {})[kind] = f"{type(e).__name__}: {e}"[:500]
                continue
            result["startup_s"][kind] = peer.startup_s
            servers.append((kind, peer.url, "/predict", peer.proc.pid))
        if args.raw:
            raw = RawForward(ours.ckpt, args)
            result["raw_windows"] = raw.windows
        save(result, rows, kinds, args, complete=False)
        for _round, size, ipr, c in itertools.product(
            range(args.rounds), args.sizes.split(","), args.images_per_request.split(","), args.concurrency.split(",")
        ):
            one = argparse.Namespace(**{**vars(args), "sizes": size, "images_per_request": ipr, "concurrency": c})
            for name, url, endpoint, pid in servers:
                if name == "litserve" and int(ipr) > 1:
                    continue  # LitServe's API here takes one image per request
                # raw windows just before and after each of our loads
                between = raw.measure if args.raw and name == "vitserve" else None

                idle = [other_pid for other, _, _, other_pid in servers if other != name] if args.pause_idle else []
                with paused(idle):  # `one` holds a single load, so this saves after every load
                    rows[name] += run_matrix(url, endpoint, pid, one, name, between)
                save(result, rows, kinds, args, complete=False)
    return save(result, rows, kinds, args, complete=True)


if __name__ == "__main__":
    main()
