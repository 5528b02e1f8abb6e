"""Valid calls while slow connections are open, against the same without them (issue 14).

What a crowd of slow sockets does to everyone else: requests/s and p99 of valid
`POST /api/` calls while `--slow` (300) slow connections are open, against the same
calls without them, in ONE run, for three web servers run in turn on one stack
(`stack.Stack` with the Echo deployment, as roundtrip.py starts it; only the web tier
is restarted between servers, Redis, the database and the worker stay up):

  ours     `processes.gunicorn_argv` as `serve` starts it: gunicorn with
           `djangollmapi.webworker.BufferingThreadWorker`, 2 workers x 32 threads;
  gthread  the same argv with `--worker-class gthread` (the server before
           webworker.py, where 70 slow sockets stall the API);
  granian  `granian --interface wsgi --workers 2 --blocking-threads 32
           --http1-header-read-timeout 5000` on the same port, with the stack's env.

For each server:

  (a) the floor: `GET /v1/bench-floor` (no such route: the web server, Django, our
      middleware and the JSON 404) from 1 and 32 clients: p50, req/s;
  (b) `POST /api/` Echo calls from `--clients` (16) keep-alive clients, each answer
      checked: req/s, p50, p99 and errors by kind, without slow sockets and then with
      `--slow` open, in `--rounds` (3) rounds whose order alternates (without/with,
      with/without, ...) so that drift on a shared machine hits both alike.

The slow sockets: half send `POST /api/ HTTP/1.1`, `Host` and nothing more (a head that
never ends); half send a whole authenticated head with `Content-Length: 9999` and then
one body byte every 1-5 s (random) from a drip thread. A socket the server closes (ours
cuts them after `[server] header_timeout_s` / `body_timeout_s`, 10 s / 30 s by default;
granian after its 5 s header timeout) is reopened at once, so `--slow` stay open
throughout the measurement; the reopenings are counted by what ended them.

A server that stalls would make every call wait its timeout: each call has
`--call-timeout` (5 s), and a case gives up after `--give-up` (48) failed calls, so it
ends; timeouts and errors are counted by kind, not raised. After each case with slow
sockets they are closed and the run waits for the server to answer again (reported).

Prints the tables and the with/without ratios per server, writes
`bench/results/faults.json`. Exit status: 0; 1 when a call failed on `ours` (gthread's
failures with slow sockets are the expected finding and do not count); 2 when the stack
did not start; 130 on Ctrl-C.

    .venv/bin/python bench/faults.py [--requests 2000] [--clients 16] [--slow 300]
        [--rounds 3] [--servers ours,gthread,granian] [--database sqlite|postgres]
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import itertools
import os
import random
import selectors
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import loadgen
from cpu import CpuMeter, wait_for_quiet
from gateway_stack import FLOOR_PATH
from loadgen import Load, Pool
from report import (
    DEFAULT_VERSIONED,
    RESULTS_DIR,
    case_summary,
    fmt,
    fmt_ms,
    fmt_ratio,
    fmt_share,
    print_request_errors,
    print_table,
    result_head,
    say,
    say_case,
    spread,
    write_result,
)
from roundtrip import ALGORITHM, DEVICE, MODEL, post_load
from stack import Stack, WebArgv, deployment_toml, install_signal_handlers, run_on_stack, server_toml

# isort: split
# After `stack`, which puts the project root on sys.path.
from djangollmapi import processes
from djangollmapi.config import ServerConfig, load_config

WEB_WORKERS = 2
WEB_THREADS = 32
FLOOR_CLIENTS = (1, 32)
GRANIAN = Path(sys.executable).parent / "granian"
GRANIAN_HEADER_TIMEOUT_MS = 5000
BODY_LENGTH = 9999
DRIP_EVERY_S = (1.0, 5.0)
CONNECT_TIMEOUT_S = 5.0
TICK_S = 0.05
SETTLE_S = 1.0  # after opening the slow sockets (the server takes them), and after closing them
RECOVERY_TIMEOUT_S = 60.0
WITHOUT, WITH = "without", "with"


# ---------------------------------------------------------------- the web servers


def gthread_argv(server: ServerConfig) -> list[str]:
    """`serve`'s argv on gunicorn's own gthread worker: the server before webworker.py."""
    argv = processes.gunicorn_argv(server)
    argv[argv.index("--worker-class") + 1] = "gthread"
    return argv


def granian_argv(server: ServerConfig) -> list[str]:
    """granian's WSGI interface in the same shape (workers, a blocking thread per web
    thread), its header read timeout at 5 s; its access log off (its default)."""
    return [
        str(GRANIAN),
        "--interface",
        "wsgi",
        "--workers",
        str(server.web_workers),
        "--blocking-threads",
        str(server.web_threads),
        "--http1-header-read-timeout",
        str(GRANIAN_HEADER_TIMEOUT_MS),
        "--host",
        server.host,
        "--port",
        str(server.port),
        "djangollmapi.wsgi:application",
    ]


SERVERS: dict[str, WebArgv] = {"ours": processes.gunicorn_argv, "gthread": gthread_argv, "granian": granian_argv}
DESCRIPTIONS = {
    "ours": f"gunicorn {processes.WEB_WORKER_CLASS} (as serve starts it), access log on",
    "gthread": "gunicorn gthread (the old server), access log on",
    "granian": f"granian WSGI, --http1-header-read-timeout {GRANIAN_HEADER_TIMEOUT_MS}, access log off (its default)",
}


# ---------------------------------------------------------------- the stack


def faults_config_toml(tmp: Path, port: int) -> str:
    """roundtrip.py's stack: one Echo deployment (delay 0) on `cpu`, gunicorn 2 x 32; the
    slow-client timeouts left at their defaults, as `serve` runs."""
    head = server_toml("faults.py", tmp, port, web_workers=WEB_WORKERS, web_threads=WEB_THREADS, default_model=MODEL)
    return head + "\n[worker]\npreload = true\n" + deployment_toml(MODEL, ALGORITHM, DEVICE, "delay_ms = 0")


# ---------------------------------------------------------------- slow sockets


@dataclass(eq=False)
class SlowConnection:
    kind: str  # "head": half a head, then nothing; "body": a whole head, then a byte every 1-5 s
    sock: socket.socket
    opened_at: float
    closed: bool = False


class SlowSockets:
    """`count` slow connections to `port`, kept open by one drip thread: it sends the
    body sockets their next byte when due, and reopens any socket the server closes
    (counted by what ended it: the server's answer, a close, a reset). A context manager:
    opened on entry, all closed on exit."""

    def __init__(self, port: int, count: int, api_key: str, rng: random.Random) -> None:
        self.port = port
        self.count = count
        self.rng = rng
        self.heads = {
            "head": b"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            "body": (
                f"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {BODY_LENGTH}\r\n\r\n"
            ).encode(),
        }
        self.selector = selectors.DefaultSelector()
        self.drips: list[tuple[float, int, SlowConnection]] = []  # a heap by due time
        self.sequence = itertools.count()  # ties in the heap
        self.retry: list[str] = []  # kinds whose connect failed: tried again next tick
        self.ended: Counter = Counter()  # "kind: what ended it" -> reopenings
        self.lifetimes: dict[str, list[float]] = {"head": [], "body": []}
        self.connect_failures: Counter = Counter()
        self.drip_bytes = 0
        self.open_s = 0.0
        self.min_open: int | None = None  # while measuring
        self.measuring = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.keep_open, name="drip", daemon=True)

    def __enter__(self) -> SlowSockets:
        started = time.monotonic()
        for i in range(self.count):
            self.open_one("head" if i % 2 == 0 else "body")
        self.open_s = time.monotonic() - started
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(CONNECT_TIMEOUT_S + 1)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()

    @property
    def open_now(self) -> int:
        return len(self.selector.get_map())

    def start_measuring(self) -> None:
        self.min_open = self.open_now
        self.measuring = True

    def stop_measuring(self) -> None:
        self.measuring = False

    def open_one(self, kind: str) -> None:
        now = time.monotonic()
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self.connect_failures[f"{kind}: {type(exc).__name__}"] += 1
            self.retry.append(kind)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.heads[kind])
        except OSError as exc:
            sock.close()
            self.connect_failures[f"{kind}: send {type(exc).__name__}"] += 1
            self.retry.append(kind)
            return
        sock.setblocking(False)
        conn = SlowConnection(kind, sock, now)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        if kind == "body":
            self.schedule_drip(conn, now)

    def schedule_drip(self, conn: SlowConnection, now: float) -> None:
        heapq.heappush(self.drips, (now + self.rng.uniform(*DRIP_EVERY_S), next(self.sequence), conn))

    def keep_open(self) -> None:
        """The drip thread: server closes, due bytes, failed connects, the open count."""
        while not self.stopping.is_set():
            for key, _events in self.selector.select(TICK_S):
                self.on_readable(key.data)
            now = time.monotonic()
            while self.drips and self.drips[0][0] <= now:
                _due, _n, conn = heapq.heappop(self.drips)
                if not conn.closed:
                    self.drip(conn, now)
            again, self.retry = self.retry, []
            for kind in again:
                self.open_one(kind)
            if self.measuring:
                self.min_open = min(self.open_now, self.count if self.min_open is None else self.min_open)

    def on_readable(self, conn: SlowConnection) -> None:
        """The server answered (a 408, say) or closed: reopen it as the same kind."""
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.replace(conn, type(exc).__name__)
            return
        if not data:
            self.replace(conn, "closed")
        elif data.startswith(b"HTTP/") and len(data.split(None, 2)) > 1:
            self.replace(conn, f"HTTP {data.split(None, 2)[1].decode('latin-1')}")
        else:
            self.replace(conn, "other bytes")

    def drip(self, conn: SlowConnection, now: float) -> None:
        try:
            conn.sock.send(b"x")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.replace(conn, f"send {type(exc).__name__}")
            return
        else:
            self.drip_bytes += 1
        self.schedule_drip(conn, now)

    def replace(self, conn: SlowConnection, ended: str) -> None:
        conn.closed = True
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.ended[f"{conn.kind}: {ended}"] += 1
        self.lifetimes[conn.kind].append(time.monotonic() - conn.opened_at)
        self.open_one(conn.kind)

    def report(self) -> dict:
        return {
            "slow_sockets": self.count,
            "open_s": round(self.open_s, 3),
            "min_open_while_measuring": self.min_open,
            "reopened": sum(self.ended.values()),
            "reopened_by_what_ended_it": dict(self.ended),
            "lifetime_s_of_those_ended": {kind: spread(values) for kind, values in self.lifetimes.items()},
            "connect_failures": dict(self.connect_failures),
            "drip_bytes": self.drip_bytes,
        }


# ---------------------------------------------------------------- measurement


def measure_floor(stack: Stack, clients: int, args: argparse.Namespace) -> dict:
    """The JSON 404 of an unrouted path from `clients` warm keep-alive clients."""
    load = Load(FLOOR_PATH, {}, method="GET", expect_status=404)
    with Pool(stack.port, clients, args.call_timeout) as pool:
        warm = pool.warm_up(load, 2 * clients)
        with CpuMeter(stack) as meter:
            outcome = pool.run(load, args.requests, max_errors=args.give_up)
    case = case_summary(f"GET {FLOOR_PATH} (404), {clients} client{'s' if clients > 1 else ''}", outcome, warm)
    return case | {"clients": clients} | meter.report(len(outcome.timings))


def measure_round(stack: Stack, mode: str, number: int, args: argparse.Namespace, rng: random.Random) -> dict:
    """One round's valid calls (fresh connections, so none sat idle past a keep-alive
    timeout), with the slow sockets open around them or not."""
    tag = f"r{number}{mode}"
    load = post_load(stack, tag, args.text_chars)
    slow = None
    with Pool(stack.port, args.clients, args.call_timeout) as pool:
        if mode == WITHOUT:
            with CpuMeter(stack) as meter:
                outcome = pool.run(load, args.requests, max_errors=args.give_up)
        else:
            with SlowSockets(stack.port, args.slow, stack.api_key, rng) as slow:
                time.sleep(SETTLE_S)
                slow.start_measuring()
                with CpuMeter(stack) as meter:
                    outcome = pool.run(load, args.requests, max_errors=args.give_up)
                slow.stop_measuring()
    result = {"round": number, "mode": mode, "outcome": outcome, "cpu": meter.report(len(outcome.timings))}
    if slow is not None:
        result["slow"] = slow.report()
        result["recovered_s"] = wait_for_answer(stack)
        time.sleep(SETTLE_S)  # what the stalled threads had queued drains
    return result


def wait_for_answer(stack: Stack) -> float | None:
    """Seconds until the server answers the floor again after the slow sockets closed
    (None: not within RECOVERY_TIMEOUT_S)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_TIMEOUT_S:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=1)
        try:
            conn.request("GET", FLOOR_PATH)
            if conn.getresponse().status == 404:
                return round(time.monotonic() - started, 3)
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
        finally:
            conn.close()
    return None


def calls_case(server: str, mode: str, rounds: list[dict], args: argparse.Namespace) -> dict:
    """The case dict of one server and mode over its rounds; 0 req/s when none succeeded."""
    mine = [r for r in rounds if r["mode"] == mode]
    slow = f", {args.slow} slow sockets open" if mode == WITH else ""
    outcome = loadgen.merged([r["outcome"] for r in mine])
    case = case_summary(f"{server}: POST /api/, {args.clients} clients{slow}", outcome)
    if not case["ok"] and outcome.wall_s > 0:
        case["requests_per_s"] = 0.0
    case["server"], case["mode"] = server, mode
    case["gave_up"] = [r["round"] for r in mine if args.give_up and r["outcome"].error_count >= args.give_up]
    case["rounds"] = [
        {
            "round": r["round"],
            "requests": r["outcome"].attempted,
            "ok": len(r["outcome"].timings),
            "errors": r["outcome"].error_count,
            "requests_per_s": round(len(r["outcome"].timings) / r["outcome"].wall_s, 1) if r["outcome"].wall_s else 0,
            **{k: r["cpu"][k] for k in ("cpu_ms_per_request", "machine_cpu_busy_share", "other_processes_cpu_share")},
            **({"slow": r["slow"], "recovered_s": r["recovered_s"]} if "slow" in r else {}),
        }
        for r in mine
    ]
    return case


def measure_server(stack: Stack, name: str, args: argparse.Namespace, rng: random.Random) -> dict:
    """One web server on the stack: (re)started, warmed, the floor, then the rounds."""
    summary: dict = {"server": name, "description": DESCRIPTIONS[name]}
    summary["argv"] = shlex.join(SERVERS[name](stack.web_config(WEB_WORKERS, WEB_THREADS)))
    if name == "granian" and not GRANIAN.exists():
        say(f"granian: {GRANIAN} not found; skipped (pip install -r requirements-dev.txt)")
        return summary | {"error": f"{GRANIAN} not found (pip install -r requirements-dev.txt)"}
    if stack.web_argv is not SERVERS[name]:
        try:
            stack.restart_web(WEB_WORKERS, WEB_THREADS, SERVERS[name])
        except RuntimeError as exc:
            if name == "ours":
                raise
            stack.stop_child("web")
            say(f"{name} did not start: {exc}")
            return summary | {"error": f"did not start: {exc}"}
    with Pool(stack.port, args.clients, args.call_timeout) as pool:  # every worker loads the app
        warm = pool.warm_up(post_load(stack, "warm", args.text_chars), args.warmup)
    summary["warmup"] = {"requests": warm.attempted, "errors": warm.error_count, "error_kinds": dict(warm.errors)}
    summary["machine_busy_share_before"] = round(wait_for_quiet(args.quiet_wait), 3)
    summary["floor"] = []
    for clients in FLOOR_CLIENTS:
        summary["floor"].append(measure_floor(stack, clients, args))
        say_case(summary["floor"][-1])
    rounds = []
    for number in range(args.rounds):
        for mode in (WITHOUT, WITH) if number % 2 == 0 else (WITH, WITHOUT):
            rounds.append(measure_round(stack, mode, number, args, rng))
            done = rounds[-1]["outcome"]
            say(
                f"{name} round {number} {mode} slow sockets: {len(done.timings)} ok, "
                f"{done.error_count} errors {dict(done.errors) or ''}"
            )
    summary["calls"] = {mode: calls_case(name, mode, rounds, args) for mode in (WITHOUT, WITH)}
    summary["ratios_with_over_without"] = ratios(summary["calls"])
    return summary


def ratios(calls: dict[str, dict]) -> dict:
    def ratio(key: str) -> float | None:
        a, b = calls[WITH][key], calls[WITHOUT][key]
        return None if not b or a != a or b != b else round(a / b, 3)

    return {"requests_per_s": ratio("requests_per_s"), "p50_ms": ratio("p50_ms"), "p99_ms": ratio("p99_ms")}


def measure_all(stack: Stack, args: argparse.Namespace) -> dict:
    config = load_config(stack.config_path).server
    timeouts = {"header_timeout_s": config.header_timeout_s, "body_timeout_s": config.body_timeout_s}
    say(f"ready; {args.rounds} rounds of {args.requests} calls per mode for {', '.join(args.servers)}")
    rng = random.Random(args.seed)
    return {"timeouts": timeouts, "servers": {name: measure_server(stack, name, args, rng) for name in args.servers}}


# ---------------------------------------------------------------- output


def errors_by_kind(case: dict) -> str:
    kinds = case.get("error_kinds") or {}
    return ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "0"


def print_floor(servers: list[dict]) -> None:
    print(f"1. the floor: GET {FLOOR_PATH} (no such route: the JSON 404), warm keep-alive clients")
    rows = [
        [
            s["server"],
            str(c["clients"]),
            str(c["requests"]),
            str(c["errors"]),
            fmt_ms(c["p50_ms"]),
            fmt_ms(c["p99_ms"]),
            fmt(c["requests_per_s"], 0),
            fmt_share(c["other_processes_cpu_share"]),
        ]
        for s in servers
        for c in s["floor"]
    ]
    print_table(["server", "clients", "requests", "errors", "p50 ms", "p99 ms", "req/s", "others"], rows)


def print_calls(servers: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n2. valid calls: POST /api/ (Echo), {args.clients} keep-alive clients, each answer checked, "
        f"timeout {args.call_timeout:g} s a call; {args.rounds} rounds of {args.requests} calls a mode, "
        f"without/with alternating (a round gives up after {args.give_up} failed calls)"
    )
    rows = []
    for s in servers:
        for mode in (WITHOUT, WITH):
            c = s["calls"][mode]
            others = max(r["other_processes_cpu_share"] for r in c["rounds"])
            rows.append(
                [
                    s["server"],
                    str(args.slow if mode == WITH else 0),
                    str(c["requests"]),
                    str(c["ok"]),
                    errors_by_kind(c),
                    fmt_ms(c["p50_ms"]),
                    fmt_ms(c["p99_ms"]),
                    fmt(c["requests_per_s"], 0),
                    " / ".join(fmt(r["requests_per_s"], 0) for r in c["rounds"]),
                    fmt_share(others),
                ]
            )
    header = ["server", "slow sockets", "calls", "ok", "errors", "p50 ms", "p99 ms", "req/s", "req/s by round"]
    print_table([*header, "others max"], rows)


def print_slow(servers: list[dict], args: argparse.Namespace, timeouts: dict) -> None:
    print(
        f"\n3. the slow sockets: {args.slow // 2 + args.slow % 2} half heads (`head`), {args.slow // 2} whole heads "
        f"with Content-Length {BODY_LENGTH} and a byte every {DRIP_EVERY_S[0]:g}-{DRIP_EVERY_S[1]:g} s (`body`); "
        f"reopened when the server ends them (ours: header_timeout_s {timeouts['header_timeout_s']:g} s, "
        f"body_timeout_s {timeouts['body_timeout_s']:g} s)"
    )
    rows = []
    for s in servers:
        for r in s["calls"][WITH]["rounds"]:
            slow = r["slow"]
            ended = ", ".join(f"{k} {v}" for k, v in sorted(slow["reopened_by_what_ended_it"].items())) or "-"
            lifetimes = " / ".join(
                fmt(slow["lifetime_s_of_those_ended"][kind].get("p50"), 1) for kind in ("head", "body")
            )
            rows.append(
                [
                    s["server"],
                    str(r["round"]),
                    fmt(slow["open_s"], 2),
                    str(slow["min_open_while_measuring"]),
                    str(slow["reopened"]),
                    ended,
                    lifetimes,
                    str(slow["drip_bytes"]),
                    "never" if r["recovered_s"] is None else fmt(r["recovered_s"], 2),
                ]
            )
    header = ["server", "round", "open s", "min open", "reopened", "ended by", "lived s p50 head/body", "drip bytes"]
    print_table([*header, "answers again s"], rows)


def print_ratios(servers: list[dict]) -> None:
    print("\n4. with slow sockets / without, per server (p50, p99 of the calls that succeeded)")
    rows = []
    for s in servers:
        without, with_ = s["calls"][WITHOUT], s["calls"][WITH]
        rows.append(
            [
                s["server"],
                fmt_ratio(with_["requests_per_s"], without["requests_per_s"]),
                fmt_ratio(with_["p50_ms"], without["p50_ms"]),
                fmt_ratio(with_["p99_ms"], without["p99_ms"]),
                f"{with_['errors']} of {with_['requests']}",
                ", ".join(str(n) for n in with_["gave_up"]) or "-",
            ]
        )
    print_table(["server", "req/s", "p50", "p99", "failed with", "rounds given up"], rows)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="calls per case and round (default 2000)")
    parser.add_argument("--clients", type=int, default=16, help="clients making valid calls (default 16)")
    parser.add_argument("--slow", type=int, default=300, help="slow connections kept open (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of without/with per server (default 3)")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"which, in this order (default {','.join(SERVERS)})"
    )
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--call-timeout", type=float, default=5.0, help="seconds a call may take (default 5)")
    parser.add_argument("--give-up", type=int, default=48, help="a round ends after this many failed calls (48)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up calls after each server starts (default 50)")
    parser.add_argument("--text-chars", type=int, default=64, help="length of each echoed text (default 64)")
    parser.add_argument("--seed", type=int, default=14, help="seed of the drip intervals (default 14)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30,
        help="before each server's cases, wait up to this many seconds for a shared machine to go quiet (default 30)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown or not args.servers:
        parser.error(f"--servers: choose from {', '.join(SERVERS)} (got {', '.join(unknown) or 'none'})")
    if min(args.requests, args.clients, args.rounds, args.give_up) < 1 or args.slow < 0:
        parser.error("--requests, --clients, --rounds and --give-up must be positive, --slow not negative")
    return args


def result_json(stack: Stack, args: argparse.Namespace, measured: dict, servers: list[dict]) -> dict:
    return result_head("faults", (*DEFAULT_VERSIONED, "granian")) | {
        "config": {
            **stack.describe(),
            "web_shape": f"{WEB_WORKERS} workers x {WEB_THREADS} threads",
            "worker": "manage.py runworker cpu (prefork, concurrency 1)",
            **measured["timeouts"],
            "granian_header_read_timeout_ms": GRANIAN_HEADER_TIMEOUT_MS,
            "load_generator": loadgen.DESCRIPTION,
            "clients": args.clients,
            "requests_per_round": args.requests,
            "rounds": args.rounds,
            "call_timeout_s": args.call_timeout,
            "give_up_after_errors": args.give_up,
            "slow_sockets": {
                "count": args.slow,
                "head": "POST /api/ HTTP/1.1 + Host, then nothing",
                "body": f"a whole authenticated head, Content-Length {BODY_LENGTH}, then a byte every "
                f"{DRIP_EVERY_S[0]:g}-{DRIP_EVERY_S[1]:g} s (seed {args.seed})",
                "reopened": "at once, when the server ends one",
            },
            "text_chars": args.text_chars,
            "toml": stack.config_text,
        },
        "servers": measured["servers"],
        "errors_ours": sum(ours_errors(s) for s in servers if s["server"] == "ours"),
    }


def ours_errors(summary: dict) -> int:
    cases = [*summary.get("floor", []), *summary.get("calls", {}).values()]
    return summary.get("warmup", {}).get("errors", 0) + sum(c["errors"] + c.get("warmup_errors", 0) for c in cases)


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-faults-"))
    stack = Stack(args.database, tmp, faults_config_toml, [DEVICE], WEB_WORKERS, WEB_THREADS)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args))
    if measured is None:
        return exit_code
    servers = [s for s in measured["servers"].values() if "calls" in s]
    print(
        f"\nfaults: {len(servers)} web servers in turn on one stack ({WEB_WORKERS} workers x {WEB_THREADS} threads "
        f"each, {args.database}, 1 cpu worker, Echo delay 0, {args.text_chars}-char texts); {os.cpu_count()} CPUs\n"
    )
    for s in measured["servers"].values():
        print(f"  {s['server']}: {s['description']}" + (f"  NOT MEASURED: {s['error']}" if "error" in s else ""))
    print()
    if servers:
        print_floor(servers)
        print_calls(servers, args)
        if args.slow:
            print_slow(servers, args, measured["timeouts"])
        print_ratios(servers)
    result = result_json(stack, args, measured, servers)
    write_result(result, RESULTS_DIR / "faults.json")
    ours = measured["servers"].get("ours")
    if result["errors_ours"] and ours:
        print_request_errors(result["errors_ours"], [*ours["floor"], *ours["calls"].values()], with_kinds=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
