"""vitserve end to end: a closed-loop load against a running server on loopback.

    python -m bench.server --spawn                          # start vitserve (random-weights S/16) and load it
    python -m bench.server --spawn --quick                  # c=1 and c=4, 640x480 single images, a few seconds each
    python -m bench.server --url http://127.0.0.1:8000 --pid 1234   # a server you started (pid: for its RSS)
    python -m bench.server --builds base=../old,new=. --rounds 4 --loads 640x480:1:16   # two checkouts in turn

For each image size (640x480, 4000x3000 JPEGs made from scikit-image's photographs), images per request (1, 32)
and concurrency (1, 16, 64; 256 on a GPU) it reports images/s, requests/s, p50/p90/p99 latency, errors by
status, and the server's peak RSS (its process tree) and the GPU's used memory. `--raw` also times our own
forward alone at the server's batch size in the same run (the ceiling the server is measured against).

On a shared machine the load changes from one second to the next, so a raw figure taken a minute before a load
says little about that load. `--rounds N --raw` therefore runs the plan N times and times the raw forward
between loads (raw, load 1, raw, load 2, raw, ...): each load is compared with the mean of the raw windows
just before and just after it (`server_over_raw`), and the summary gives medians over the rounds.

`--builds NAME=DIR,...` compares checkouts of vitserve (a `git worktree` of an older commit, say) on this
machine: each round starts the server of every build in turn (its `app` from DIR; one checkpoint, written once,
and this checkout's load generator, so only the server differs) and loads it, and `ratios` gives each build's
median images/s and p50 over the first build's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.loadgen import Load, Spawned, Watcher, free_port, parse_size, photo_jpeg, run_load, spawn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__.split("\n")[0])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--spawn", action="store_true", help="start vitserve here (the default without --url)")
    target.add_argument("--url", help="base URL of a running server (loopback only)")
    target.add_argument("--builds", help="NAME=DIR,...: spawn the app of each checkout in turn, every round")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its memory")
    p.add_argument("--device", default="cpu", help="for --spawn: cpu, cuda, auto")
    p.add_argument("--dtype", default=None, help="for --spawn: default float32 on CPU, bfloat16 on CUDA")
    p.add_argument(
        "--shape", default="s16", help="for --spawn: ti16, s16, b16, or micro (the server around a free model)"
    )
    p.add_argument("--compile", default="auto", choices=("off", "auto"), help="for --spawn: the server's --compile")
    p.add_argument("--max-batch-size", type=int, default=None, help="for --spawn")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the spawned server (repeat)")
    p.add_argument("--endpoint", default="/v1/classify?top_k=5")
    p.add_argument("--concurrency", default=None, help="comma list (default 1,16,64; 1,16,64,256 on CUDA)")
    p.add_argument("--images-per-request", default="1,32")
    p.add_argument("--sizes", default="640x480,4000x3000")
    p.add_argument("--loads", default=None, help="instead of the matrix: SIZE:IMAGES:CONCURRENCY,... (640x480:32:16)")
    p.add_argument("--seconds", type=float, default=10.0, help="per load")
    p.add_argument("--max-requests", type=int, default=0, help="per load; 0: bounded by --seconds only")
    p.add_argument("--procs", type=int, default=None, help="client processes (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--raw", action="store_true", help="also time our forward alone at the server's batch size")
    p.add_argument("--rounds", type=int, default=1, help="run the plan N times; with --raw, raw windows between loads")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="length of each raw window (with --rounds)")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--quick", action="store_true", help="640x480 single images at c=1 and 4, 4 s each")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.builds:
        args.builds = dict(item.split("=", 1) for item in args.builds.split(","))  # {name: folder}, in order
        for name, folder in args.builds.items():
            if not (Path(folder) / "app" / "__main__.py").is_file():
                p.error(f"--builds {name}={folder} holds no app/__main__.py")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and _cuda())
    if args.quick:
        args.concurrency = args.concurrency or "1,4"
        args.images_per_request, args.sizes, args.seconds = "1", "640x480", min(args.seconds, 4.0)
    args.concurrency = args.concurrency or ("1,16,64,256" if cuda else "1,16,64")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.max_batch_size = args.max_batch_size or (64 if cuda else 8)
    args.procs = args.procs or (4 if cuda else 1)
    args.cuda = cuda
    return args


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class VitServe(Spawned):
    """vitserve in a subprocess on loopback, with a random-weights native checkpoint in a temp folder."""

    def __init__(self, args: argparse.Namespace, app_dir: str | None = None, ckpt: Path | None = None):
        self.args = args
        self.app_dir = app_dir  # a checkout whose `app` to run; None: this one's
        self.folder = common.temp_dir("vitserve-bench-")
        self.ckpt = ckpt or common.write_native_checkpoint(args.shape, self.folder, name="bench")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.startup_s = None

    def command(self) -> list[str]:
        a = self.args
        return [
            sys.executable,
            "-m",
            "app",
            "--model",
            f"bench={self.ckpt}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            a.device,
            "--dtype",
            a.dtype,
            "--max-batch-size",
            str(a.max_batch_size),
            "--log-level",
            "warning",
            *a.server_arg,
        ]

    def start(self) -> VitServe:
        env = {"VIT_COMPILE": self.args.compile, "PYTHONUNBUFFERED": "1"}
        if self.app_dir is not None:
            env["PYTHONPATH"] = str(Path(self.app_dir).resolve())
        self.log = str(self.folder / "server.log")
        self._t0 = time.perf_counter()
        self.proc = spawn(self.command(), env, self.log, cwd=self.app_dir)
        return self


class RawForward:
    """Our forward alone at the server's batch size (same checkpoint, dtype and `--compile`, so the same runner's
    fast path: packed linear layers on a CPU, CUDA graphs on a GPU), in this process."""

    def __init__(self, ckpt: Path, args: argparse.Namespace):
        import torch

        from app.engine import load_model
        from app.runner import ThreadShare, make_runner

        self.batch, self.seconds = args.max_batch_size, args.raw_seconds
        self.windows: list[dict] = []  # every measurement, in order
        self.model = load_model(str(ckpt), device=args.device, dtype=args.dtype)
        self.threads = torch.get_num_threads()
        start = time.perf_counter()
        # what the spawned server runs by default: its lanes too (`ThreadShare` and `lanes=None` as it passes them)
        self.runner = make_runner(
            self.model, max_batch_size=self.batch, fast=args.compile != "off", share=ThreadShare(self.threads)
        )
        graphs = getattr(self.runner, "graphs", None)  # CUDA: the graph buckets, captured here
        if graphs is not None:
            graphs.capture_all()
        self.build = {"runner": time.perf_counter() - start, **(graphs.build_seconds if graphs is not None else {})}
        self.forward = self.model if graphs is None else torch.inference_mode()(graphs)  # a CPU: the model runs packed
        self.lanes = self.runner.lanes
        # the input as the server hands it to the forward: normalised, in the model's dtype (micro: 32x32)
        self.x = torch.randn(self.batch, 3, *self.model.config.image_size, device=self.model.device).to(
            self.model.dtype
        )

    def measure(self) -> dict:
        """Time the forward for about `--raw-seconds` (at least 3 calls); kept in `windows` too. With lanes (a
        CPU), also `lanes_images_per_s`: that many forwards at once sharing the threads, as the server runs them."""
        fns = {"ours": lambda: self.forward(self.x)}
        timing = common.time_interleaved(fns, str(self.model.device), 3, self.seconds, warmup=1)["ours"]
        out = timing.as_dict(self.batch)
        out.update({"fast_path": self.runner.fast_path, "loadavg": os.getloadavg()[0]})
        if self.lanes > 1:
            out["lanes"], out["lanes_images_per_s"] = self.lanes, round(self._lanes_rate(), 2)
        self.windows.append(out)
        return out

    def _lanes_rate(self) -> float:
        from concurrent.futures import ThreadPoolExecutor

        from app.runner import ThreadShare

        share = ThreadShare(self.threads)
        deadline = time.perf_counter() + self.seconds

        def lane(_: int) -> int:
            images = 0
            while time.perf_counter() < deadline:
                with share.slot():
                    self.forward(self.x)
                images += self.batch
            return images

        start = time.perf_counter()
        with ThreadPoolExecutor(self.lanes) as pool:
            images = sum(pool.map(lane, range(self.lanes)))
        return images / (time.perf_counter() - start)


def load_plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(size, images per request, concurrency) for each load: --loads as given, else the full matrix."""
    if getattr(args, "loads", None):
        plan = []
        for item in args.loads.split(","):
            size, ipr, c = item.split(":")
            plan.append((size, int(ipr), int(c)))
        return plan
    return [
        (size, int(ipr), int(c))
        for size in args.sizes.split(",")
        for ipr in args.images_per_request.split(",")
        for c in args.concurrency.split(",")
    ]


def run_matrix(
    base_url: str,
    endpoint: str,
    pid: int | None,
    args: argparse.Namespace,
    label: str,
    between: Callable[[], dict] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every planned load against one server, in order; `between()` (a raw window) before and after each;
    `on_row(row)` as each load finishes (to save what is done so far)."""
    rows = []
    jpegs: dict[str, bytes] = {}
    raw_before = between() if between else None
    for size, ipr, c in load_plan(args):
        jpeg = jpegs.setdefault(size, photo_jpeg(*parse_size(size)))
        load = Load(
            url=base_url + endpoint,
            jpeg=jpeg,
            images_per_request=ipr,
            concurrency=c,
            seconds=args.seconds,
            max_requests=args.max_requests,
            procs=args.procs,
        )
        with Watcher(pid, args.cuda) as w:
            row = run_load(load)
        row.update(w.report())
        if row.get("main_thread_cpu_s") is not None and row["ok"]:
            row["main_thread_cpu_ms_per_request"] = round(row["main_thread_cpu_s"] * 1000 / row["ok"], 3)
        row.update({"server": label, "image": size, "jpeg_bytes": len(jpeg), "loadavg": os.getloadavg()[0]})
        if between is not None:
            raw_after = between()
            raw = (raw_before["images_per_s"] + raw_after["images_per_s"]) / 2
            row.update({"raw_images_per_s": round(raw, 2), "server_over_raw": round(row["images_per_s"] / raw, 3)})
            if "lanes_images_per_s" in raw_after:
                lanes = (raw_before["lanes_images_per_s"] + raw_after["lanes_images_per_s"]) / 2
                row["raw_lanes_images_per_s"] = round(lanes, 2)
                row["server_over_raw_lanes"] = round(row["images_per_s"] / lanes, 3)
            raw_before = raw_after
        rows.append(row)
        print_row(row)
        if on_row is not None:
            on_row(row)
    return rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per load (server, image, images per request, concurrency) over several rounds: the middle round
    by images/s, with the medians of images/s, of each latency percentile and of server/raw."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["image"], r["images_per_request"], r["concurrency"]), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        mid = dict(sorted(group, key=lambda r: r["images_per_s"])[len(group) // 2])
        for key in (
            "images_per_s",
            "raw_images_per_s",
            "server_over_raw",
            "raw_lanes_images_per_s",
            "server_over_raw_lanes",
        ):
            if key in mid:
                mid[key] = round(statistics.median(r[key] for r in group), 3)
        mid["latency_ms"] = {
            q: round(statistics.median(r["latency_ms"][q] for r in group), 1) for q in mid["latency_ms"]
        }
        mid["rounds"] = len(group)
        mid["images_per_s_by_round"] = [r["images_per_s"] for r in group]
        if "server_over_raw" in mid:
            mid["server_over_raw_by_round"] = [r["server_over_raw"] for r in group]
        out.append(mid)
    return out


def build_ratios(rows: list[dict], names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """For each load, each build's median images/s and p50 over the first build's (>1: the build is faster, its
    p50 longer)."""
    by_load: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_load.setdefault(f"{r['image']}x{r['images_per_request']}:c{r['concurrency']}", {})[r["server"]] = r
    ratios = {}
    for load, rs in by_load.items():
        first = rs.get(names[0])
        if first is None:
            continue
        ratios[load] = {
            name: {
                "images_per_s": round(r["images_per_s"] / first["images_per_s"], 3),
                "p50": round(r["latency_ms"]["p50"] / first["latency_ms"]["p50"], 3),
            }
            for name, r in rs.items()
            if name != names[0]
        }
    return ratios


def print_row(r: dict) -> None:
    lat = r["latency_ms"]
    vs_raw = f"  raw {r['raw_images_per_s']:.1f} img/s -> x{r['server_over_raw']:.2f}" if "server_over_raw" in r else ""
    if "server_over_raw_lanes" in r:
        vs_raw += f", lanes {r['raw_lanes_images_per_s']:.1f} -> x{r['server_over_raw_lanes']:.2f}"
    print(
        f"# {r['server']:>10} {r['image']:>9} x{r['images_per_request']:<2} c={r['concurrency']:<3} "
        f"{r['images_per_s']:>9.1f} img/s  p50 {lat['p50']:>8.1f} ms  p99 {lat['p99']:>8.1f} ms  "
        f"errors {r['errors'] or '-'}  rss {r.get('peak_rss_mib')} MiB  tree pss {r.get('peak_tree_pss_mib')} MiB"
        f"{vs_raw}",
        flush=True,
    )


def table_rows(rows: list[dict]) -> str:
    cols = ["server", "image", "x", "c", "img/s", "req/s", "p50", "p90", "p99", "errors", "rss MiB", "pss MiB"]
    cols += ["loop ms/req", "load"]
    if any("server_over_raw" in r for r in rows):
        cols += ["raw img/s", "server/raw"]
    if any("server_over_raw_lanes" in r for r in rows):
        cols += ["raw lanes img/s", "server/raw lanes"]
    out = [
        {
            "server": r["server"],
            "image": r["image"],
            "x": r["images_per_request"],
            "c": r["concurrency"],
            "img/s": r["images_per_s"],
            "req/s": r["requests_per_s"],
            "p50": r["latency_ms"]["p50"],
            "p90": r["latency_ms"]["p90"],
            "p99": r["latency_ms"]["p99"],
            "errors": r["errors"] or "-",
            "rss MiB": r.get("peak_rss_mib"),
            "pss MiB": r.get("peak_tree_pss_mib"),
            "loop ms/req": r.get("main_thread_cpu_ms_per_request"),
            "load": round(r["loadavg"], 2),
            "raw img/s": r.get("raw_images_per_s"),
            "server/raw": r.get("server_over_raw"),
            "raw lanes img/s": r.get("raw_lanes_images_per_s"),
            "server/raw lanes": r.get("server_over_raw_lanes"),
        }
        for r in rows
    ]
    return common.table(out, cols)


def save(result: dict, rounds: list[list[dict]], args: argparse.Namespace, complete: bool) -> dict:
    """Fill `result` with the loads finished so far and write it to `args.out`: after every load with
    `"complete": false` (a run killed by its time limit keeps what it finished), and once more at the end."""
    result["rounds"] = rounds if args.rounds > 1 else None
    result["results"] = median_rows([row for r in rounds for row in r])
    result["complete"] = complete
    result["env"]["loadavg_end"] = os.getloadavg()
    common.write_json(result, args.out, echo=complete)
    return result


def main(argv: list[str] | None = None) -> dict:
    common.exit_on_sigterm()
    args = parse_args(argv)
    result = {"bench": "server", "env": common.environment("cuda" if args.cuda else "cpu"), "args": vars(args)}
    rounds: list[list[dict]] = []

    def record(row: dict) -> None:
        rounds[-1].append(row)
        save(result, rounds, args, complete=False)

    save(result, rounds, args, complete=False)  # a file from the start, even if the server never comes up
    if args.builds:
        result["builds"] = {name: common.git_head(folder) for name, folder in args.builds.items()}
        ckpt = common.write_native_checkpoint(args.shape, common.temp_dir("vitserve-bench-"), name="bench")
        for _ in range(args.rounds):
            rounds.append([])
            for name, folder in args.builds.items():
                with VitServe(args, folder, ckpt) as server:
                    run_matrix(server.url, args.endpoint, server.proc.pid, args, name, on_row=record)
        result["ratios"] = build_ratios(result["results"], list(args.builds))
        print(json.dumps(result["ratios"], indent=1))
    elif args.url:
        for _ in range(args.rounds):
            rounds.append([])
            run_matrix(args.url.rstrip("/"), args.endpoint, args.pid, args, "vitserve", on_row=record)
    else:
        with VitServe(args) as server:
            result["startup_s"] = server.startup_s
            between = None
            if args.raw:
                raw = RawForward(server.ckpt, args)
                result["raw_build_s"] = {str(k): round(v, 1) for k, v in raw.build.items()}
                result["raw_windows"] = raw.windows
                between = raw.measure
            save(result, rounds, args, complete=False)  # the start-up, even if no load finishes
            for _ in range(args.rounds):
                rounds.append([])
                run_matrix(server.url, args.endpoint, server.proc.pid, args, "vitserve", between, on_row=record)
    print(table_rows(result["results"]))
    return save(result, rounds, args, complete=True)


if __name__ == "__main__":
    main()
