"""A bounded soak: well-behaved requests beside slow uploads, image bombs and a killed worker, for N minutes.

    python -m bench.soak                        # 10 minutes, --workers 2, the defaults below
    python -m bench.soak --minutes 2 --kill-at-min 1 --baseline-s 20

It starts vitserve (random-weights Ti/16, `--workers 2`) on loopback and runs, after a warm-up and a quiet
baseline of well-behaved requests alone:
- well-behaved: `--rate` single 640x480 JPEGs a second to /v1/classify, each on a new connection (so that only
  requests in flight on the killed worker lose theirs), sent on a fixed schedule whatever the answers;
- slow bodies: `--slow` connections at all times, half trickling 5 bytes every 5 s into a 100 KB body, half
  sending all but the last KiB of a 20 MiB body and stalling (unless refused within half a second of their
  headers); each opens again once answered or closed (a second later when refused);
- bombs: `--bombs-per-s` images in turn: a PNG and a JPEG that claim 60,000 x 60,000 pixels, and a
  progressive JPEG of 300 scans;
- at `--kill-at-min`, one worker killed with SIGKILL (the supervisor replaces it).

When the load ends the slow bodies close; 10 s later the server's memory is read once more. The JSON report
gives every answer's status by kind, p50/p99 of the well-behaved requests against the baseline (also without
the 30 s after the kill), the resident memory of the server's process tree over time, and the three targets:
no 5xx for well-behaved requests and bombs besides the killed worker's requests in flight (slow bodies beyond
the byte budget get 503 by design), p99 within 2x of the baseline, memory within 150 MB of its start 10 s after
the slow bodies end. Beside them, once a second during the load: /readyz's status and `vit_queue_depth`.
Only loopback is ever contacted; every loop ends with the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import common
from bench.loadgen import free_port, photo_jpeg, spawn, stop, wait_ready

MiB = 1 << 20
KILL_WINDOW_S = 30.0  # after the kill: the replacement loads beside the survivor, which serves alone
RSS_TARGET_MB = 150
P99_TARGET_X = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="the mixed load (default 10)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=8.0, help="well-behaved requests a second (default 8)")
    p.add_argument("--slow", type=int, default=64, help="slow bodies open at all times (default 64)")
    p.add_argument("--bombs-per-s", type=float, default=1.0)
    p.add_argument("--kill-at-min", type=float, default=5.0, help="kill one worker then; negative: never")
    p.add_argument("--warmup-s", type=float, default=20.0, help="well-behaved requests first, not measured")
    p.add_argument("--baseline-s", type=float, default=60.0, help="the quiet baseline before the load")
    p.add_argument("--shape", default="ti16", help="the random-weights model: ti16, s16, b16, micro")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeat)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="also write the JSON report here")
    return p.parse_args(argv)


# -- bombs --------------------------------------------------------------------------------------------------


def png_bomb(side: int = 60_000) -> bytes:
    """A PNG whose header claims side x side RGB pixels; its data is a few bytes of one zlib stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * 64), 9)  # one row's worth: the decoder would need all the others
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def jpeg_bomb(jpeg: bytes, side: int = 60_000) -> bytes:
    """A real JPEG whose frame header (SOF) claims side x side pixels."""
    i = 2
    while i < len(jpeg):
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return jpeg[: i + 5] + struct.pack(">HH", side, side) + jpeg[i + 9 :]
        i += 2 + length
    raise ValueError("no frame header in the JPEG")


def scans_bomb(jpeg: bytes, scans: int = 300) -> bytes:
    """A progressive JPEG with its first scan repeated `scans` times: each scan is a pass over the whole image."""
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.open(BytesIO(jpeg)).save(out, "JPEG", quality=90, progressive=True)
    data = out.getvalue()
    start = data.index(b"\xff\xda")  # the first scan's header (SOS)
    end = start + 2 + struct.unpack(">H", data[start + 2 : start + 4])[0]
    while True:  # its entropy-coded data runs to the next marker (0xFF 0x00 is a stuffed byte, 0xFFD0-D7 restarts)
        end = data.index(b"\xff", end)
        if data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7:
            break
        end += 2
    return data[:end] + data[start:end] * scans + data[end:]


# -- the server's processes ------------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> tuple[float, dict[int, float]]:
    """Resident memory of the process and its descendants (MB), and of each."""
    import psutil

    each: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                each[proc.pid] = proc.memory_info().rss / 1e6
    return round(sum(each.values()), 1), each


def worker_pids(supervisor: int) -> list[int]:
    """The server processes under the supervisor (multiprocessing's spawned children, not its resource tracker)."""
    import psutil

    pids = []
    for proc in psutil.Process(supervisor).children():
        with contextlib.suppress(psutil.Error):
            line = " ".join(proc.cmdline())
            if "spawn_main" in line and "resource_tracker" not in line:
                pids.append(proc.pid)
    return sorted(pids)


# -- the clients -------------------------------------------------------------------------------------------------


@dataclass
class Record:
    kind: str  # good, slow, bomb
    started: float
    ended: float
    status: int  # 0: a connection error
    error: str = ""


@dataclass
class Soak:
    host: str
    port: int
    rate: float
    slow: int
    bombs_per_s: float
    jpeg: bytes
    records: list[Record] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def post(self, kind: str, path: str, body: bytes, content_type: str) -> None:
        """One request on a new connection, its answer's status recorded."""
        started = time.monotonic()
        status, error = 0, ""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                head = f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: {content_type}\r\n"
                head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 120)
                await reader.read()  # the rest, to the close: the whole answer has arrived
                status = int(line.split()[1]) if line else 0
                error = "" if line else "closed without an answer"
            finally:
                writer.close()
        except (TimeoutError, OSError, ValueError, IndexError) as e:
            error = type(e).__name__
        self.records.append(Record(kind, started, time.monotonic(), status, error))

    async def scheduled(self, kind: str, per_s: float, make: list[tuple[str, bytes, str]], until: float) -> None:
        """Requests on a fixed schedule (open loop): each starts on time, whatever the others' answers."""
        tasks = set()
        n = 0
        start = time.monotonic()
        while (due := start + n / per_s) < until:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            path, body, content_type = make[n % len(make)]
            task = asyncio.create_task(self.post(kind, path, body, content_type))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.wait(tasks, timeout=130)

    async def slow_body(self, big: bool) -> None:
        """One slow connection after another until the load ends: a trickle, or a 20 MiB body that stalls."""
        length = 20 * MiB if big else 100_000
        while not self.stopping.is_set():
            started = time.monotonic()
            status, error = 0, ""
            writer = None
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                head = "POST /v1/classify HTTP/1.1\r\nHost: soak\r\nContent-Type: image/jpeg\r\n"
                writer.write(f"{head}Content-Length: {length}\r\n\r\n".encode())
                answer = asyncio.ensure_future(reader.readline())
                if big:  # unless refused at once (503 for the byte budget), as a client with Expect: 100-continue
                    await asyncio.wait([answer], timeout=0.5)
                if big and not answer.done():
                    piece = b"\0" * MiB
                    for _ in range(length // MiB - 1):
                        writer.write(piece)
                        await writer.drain()
                    writer.write(piece[:-1024])
                    await writer.drain()
                while not answer.done() and not self.stopping.is_set():
                    if not big:
                        writer.write(b"\0" * 5)
                        await writer.drain()
                    await asyncio.wait([answer, stop], timeout=5)
                if answer.done():
                    line = answer.result()
                    status = int(line.split()[1]) if line else 0
                    error = "" if line else "closed without an answer"
                else:
                    answer.cancel()
                    error = "closed by the client"  # the load ended
            except (OSError, ValueError, IndexError) as e:
                error = type(e).__name__
            finally:
                stop.cancel()
                if writer is not None:
                    writer.close()
            self.records.append(Record("slow_big" if big else "slow_trickle", started, time.monotonic(), status, error))
            if status != 408 and not self.stopping.is_set():
                await asyncio.sleep(1.0)  # refused (503, Retry-After: 1) or reset while still sending

    async def run(self, seconds: float, attack: bool) -> None:
        """Well-behaved requests (and with `attack`, bombs) here; the slow bodies in a process of their own, so
        that their work never delays the measured clients' event loop."""
        until = time.monotonic() + seconds
        good = [("/v1/classify?top_k=5", self.jpeg, "image/jpeg")]
        jobs = [self.scheduled("good", self.rate, good, until)]
        slow = None
        if attack:
            bombs = [
                ("/v1/classify", png_bomb(), "image/png"),
                ("/v1/classify", jpeg_bomb(self.jpeg), "image/jpeg"),
                ("/v1/classify", scans_bomb(self.jpeg), "image/jpeg"),
            ]
            jobs.append(self.scheduled("bomb", self.bombs_per_s, bombs, until))
            context = multiprocessing.get_context("spawn")
            results = context.Queue()
            slow = context.Process(target=slow_bodies, args=(self.host, self.port, self.slow, until, results))
            slow.start()
        await asyncio.gather(*jobs)
        self.stopping.set()
        if slow is not None:
            records = await asyncio.get_running_loop().run_in_executor(None, results.get, True, 60)
            self.records += [Record(*r) for r in records]
            slow.join(10)

    async def slow_until(self, until: float) -> None:
        tasks = [asyncio.create_task(self.slow_body(big=i % 2 == 1)) for i in range(self.slow)]
        await asyncio.sleep(until - time.monotonic())
        self.stopping.set()
        await asyncio.gather(*tasks)


def slow_bodies(host: str, port: int, n: int, until: float, results: multiprocessing.Queue) -> None:
    """In a process of its own: n slow bodies until `until` (time.monotonic, the same clock in every process);
    their records go back through `results`."""
    soak = Soak(host, port, 0.0, n, 0.0, b"")
    asyncio.run(soak.slow_until(until))
    results.put([(r.kind, r.started, r.ended, r.status, r.error) for r in soak.records])


async def get(host: str, port: int, path: str) -> tuple[int, str]:
    """A GET on a new connection: its status (0 for a connection error) and body."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode("utf-8", "replace")
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0, ""


# -- the report ---------------------------------------------------------------------------------------------


def latency_ms(records: list[Record]) -> dict:
    ok = [(r.ended - r.started) * 1000 for r in records if r.status == 200]
    return {
        "answered_200": len(ok),
        "p50_ms": round(common.percentile(ok, 50), 1),
        "p99_ms": round(common.percentile(ok, 99), 1),
    }


def statuses(records: list[Record]) -> dict:
    counts = Counter(str(r.status) if r.status else f"error: {r.error}" for r in records)
    return dict(sorted(counts.items()))


def report(baseline: list[Record], load: list[Record], kill: dict | None, rss: dict) -> dict:
    killed_at = kill["at"] if kill else None

    def in_flight_at_kill(r: Record) -> bool:
        return killed_at is not None and r.status == 0 and r.started <= killed_at <= r.ended + 1.0

    excused = [r for r in load if in_flight_at_kill(r)]
    counted = [r for r in load if not in_flight_at_kill(r)]
    by_kind = {k: [r for r in counted if r.kind == k] for k in sorted({r.kind for r in counted})}
    good = by_kind.get("good", [])
    out: dict = {
        "baseline": {"statuses": statuses(baseline), **latency_ms(baseline)},
        "load": {kind: {"statuses": statuses(rs)} for kind, rs in by_kind.items()},
    }
    out["load"]["good"].update(latency_ms(good))
    if killed_at is not None:
        calm = [r for r in good if not killed_at <= r.started <= killed_at + KILL_WINDOW_S]
        out["load"]["good"]["outside_the_kill"] = latency_ms(calm)
        out["killed_worker"] = {
            **{k: v for k, v in kill.items() if k != "at"},
            "requests_in_flight_lost": dict(Counter(r.kind for r in excused)),
        }
    out["rss_mb"] = rss
    # slow bodies refused by the byte budget get 503 by design; well-behaved requests and bombs never should
    five_xx = sum(1 for r in counted if r.status >= 500 and r.kind in ("good", "bomb"))
    base_p99 = out["baseline"]["p99_ms"]
    out["targets"] = {
        "no_5xx_for_well_behaved_requests_or_bombs": five_xx == 0,
        "well_behaved_p99_within_2x_of_baseline": out["load"]["good"]["p99_ms"] <= P99_TARGET_X * base_p99,
        "rss_within_150_mb_of_start_10_s_after_the_slow_bodies_end": rss["after_slow_bodies_end"] - rss["start"]
        <= RSS_TARGET_MB,
    }
    return out


# -- the run -----------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, url: str, supervisor: int, jpeg: bytes) -> dict:
    port = int(url.rsplit(":", 1)[1])
    print(f"warm-up: {args.warmup_s:g} s, not measured", file=sys.stderr)
    await Soak("127.0.0.1", port, args.rate, 0, 0.0, jpeg).run(args.warmup_s, attack=False)
    quiet = Soak("127.0.0.1", port, args.rate, 0, 0.0, jpeg)
    print(f"baseline: {args.baseline_s:g} s of {args.rate:g} well-behaved requests a second", file=sys.stderr)
    machine_load = {"baseline_start": os.getloadavg()[0]}  # the machine's 1-minute load average: others' work too
    await quiet.run(args.baseline_s, attack=False)
    machine_load["load_start"] = os.getloadavg()[0]

    start_rss, _ = tree_rss_mb(supervisor)
    samples: list[tuple[float, float]] = [(0.0, start_rss)]
    loaded = Soak("127.0.0.1", port, args.rate, args.slow, args.bombs_per_s, jpeg)
    t0 = time.monotonic()
    kill: dict | None = None

    ready: Counter = Counter()  # /readyz's answers, once a second
    depths: list[float] = []  # vit_queue_depth, summed over the workers, once a second

    async def watch() -> None:
        nonlocal kill
        while not loaded.stopping.is_set():
            await asyncio.sleep(1.0)
            status, _ = await get("127.0.0.1", port, "/readyz")
            ready[str(status)] += 1
            status, text = await get("127.0.0.1", port, "/metrics")
            if status == 200:
                lines = [line for line in text.splitlines() if line.startswith("vit_queue_depth{")]
                depths.append(sum(float(line.split()[-1]) for line in lines))
            now = time.monotonic() - t0
            if not samples or now - samples[-1][0] >= 10:
                samples.append((round(now, 1), tree_rss_mb(supervisor)[0]))
            if kill is None and 0 <= args.kill_at_min * 60 <= now:
                before = worker_pids(supervisor)
                victim = before[0]
                os.kill(victim, signal.SIGKILL)
                kill = {"at": time.monotonic(), "at_s": round(now, 1), "pid": victim, "workers_before": before}
                print(f"{now:.0f} s: killed worker {victim}", file=sys.stderr)
            elif kill is not None and "replaced_by" not in kill:
                now_pids = [p for p in worker_pids(supervisor) if p not in kill["workers_before"]]
                if now_pids:
                    kill["replaced_by"] = now_pids[0]
                    kill["replacement_seen_after_s"] = round(time.monotonic() - kill["at"], 1)

    print(f"load: {args.minutes:g} min", file=sys.stderr)
    watcher = asyncio.create_task(watch())
    await loaded.run(args.minutes * 60, attack=True)
    await watcher
    ended = time.monotonic() - t0
    await asyncio.sleep(10.0)
    after, each = tree_rss_mb(supervisor)
    samples.append((round(time.monotonic() - t0, 1), after))
    if kill is not None:
        kill.pop("workers_before", None)
    rss = {
        "start": start_rss,
        "peak": max(s[1] for s in samples),
        "after_slow_bodies_end": after,
        "load_ended_at_s": round(ended, 1),
        "over_time": samples,
        "processes_at_the_end": {str(k): round(v, 1) for k, v in each.items()},
    }
    machine_load["load_end"] = os.getloadavg()[0]
    result = report(quiet.records, loaded.records, kill, rss)
    result["machine_load_average_1m"] = machine_load
    good = sorted((r for r in loaded.records if r.kind == "good"), key=lambda r: r.started)
    result["well_behaved_by_minute"] = [
        {"minute": m, **latency_ms([r for r in good if m * 60 <= r.started - t0 < (m + 1) * 60])}
        for m in range(math.ceil(args.minutes))
    ]
    result["during_the_load"] = {
        "readyz_statuses": dict(ready),
        "queue_depth_max": max(depths, default=0.0),
        "queue_depth_mean": round(sum(depths) / max(1, len(depths)), 2),
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder = common.temp_dir("vitserve-soak-")
    ckpt = common.write_native_checkpoint(args.shape, folder, name="soak")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "app",
        f"--model=soak={ckpt}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--device=cpu",
        f"--workers={args.workers}",
        "--log-level=warning",
        *args.server_arg,
    ]
    proc = spawn(command, {"PYTHONUNBUFFERED": "1"}, str(folder / "server.log"))
    try:
        wait_ready(f"{url}/readyz", proc, args.ready_timeout)
        jpeg = photo_jpeg(640, 480)
        result = asyncio.run(soak(args, url, proc.pid, jpeg))
    finally:
        stop(proc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    result = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1)},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **result,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
