"""CPU per request of the web tier, this checkout against another commit, side by side
in one run: what a change costs the process that serves each call.

Each checkout gets a stack of its own: a temp data dir with SQLite, an embedded Redis,
a key, its own `manage.py runworker cpu` (Echo), and one shared fake provider
(`bench/fake_upstream.py`). Then one child process per checkout serves Django
in-process (the test client: every middleware, the view, the database writes, Redis
and the provider; no gunicorn, no client socket) and runs bursts of requests on
command. Bursts alternate between the checkouts, path by path, so both see the same
machine; a burst's CPU is the child's own process time (`time.process_time`), so
another process's load reaches it only through shared caches and the clock. Reported
per path: the best and the median burst, in CPU ms per request, and new / old; and the
Python function calls a request makes (counted with a profile hook in one more burst:
a number no other process can disturb, where the times move by a few per cent from run
to run).

    .venv/bin/python bench/web_cpu.py [--against REV] [--bursts 15] [--requests 100]

`--against` (default HEAD) is checked out into a temporary git worktree. Writes
`bench/results/web_cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (path, method, body, expected status): what each burst sends, identical for both.
UPSTREAM_CHAT = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
LOCAL_CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}
PATHS = {
    "upstream chat (/v1, a provider's model)": ("/v1/chat/completions", "POST", UPSTREAM_CHAT, 200),
    "local chat (/v1, Echo in the worker)": ("/v1/chat/completions", "POST", LOCAL_CHAT, 200),
    "seed /api/ (Echo in the worker)": ("/api/", "POST", {"text": "hello", "model": "echo"}, 200),
    "floor (GET /v1/bench-floor -> JSON 404)": ("/v1/bench-floor", "GET", None, 404),
}


def child(root: str, key: str) -> None:
    """In a checkout's own Django: answer `<path name>\\t<n>` with the burst's CPU."""
    sys.path.insert(0, root)
    import django

    django.setup()
    from django.test import Client

    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {key}")
    calls = [0]

    def count_call(frame, event, arg) -> None:
        if event in ("call", "c_call"):
            calls[0] += 1

    for line in sys.stdin:
        mode, name, count = line.rstrip("\n").split("\t")
        path, method, body, expected = PATHS[name]
        cpu0, wall0, wrong, calls[0] = time.process_time(), time.perf_counter(), 0, 0
        if mode == "count":
            sys.setprofile(count_call)
        for _ in range(int(count)):
            if method == "GET":
                response = client.get(path)
            else:
                response = client.post(path, data=json.dumps(body), content_type="application/json")
            wrong += response.status_code != expected
        sys.setprofile(None)
        reply = {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0, "wrong": wrong}
        print(json.dumps({**reply, "calls": calls[0]}), flush=True)


if len(sys.argv) > 1 and sys.argv[1] == "--child":
    child(sys.argv[2], sys.argv[3])
    sys.exit(0)

# isort: split
# The parent, from here on: this checkout's bench helpers.
import internals  # noqa: E402
import report  # noqa: E402
from stack import free_port, install_signal_handlers  # noqa: E402

from djangollmapi import processes  # noqa: E402

ROOT = report.ROOT
UPSTREAM_SECRET = "sk-fake-upstream-bench"


class Checkout:
    """One checkout's stack and its in-process Django child."""

    def __init__(self, label: str, root: Path, tmp: Path, upstream_port: int) -> None:
        self.label, self.root, self.tmp = label, root, tmp
        self.children: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "DJANGO_LLM_API_CONFIG": str(tmp / "bench.toml"),
            "DJANGO_LLM_API_DATA_DIR": str(tmp),
            "DJANGO_SETTINGS_MODULE": "djangollmapi.settings",
            "DATABASE_URL": "",
            "REDIS_URL": f"unix://{tmp / 'redis.sock'}",
            "BENCH_UPSTREAM_KEY": UPSTREAM_SECRET,
        }
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        (tmp / "bench.toml").write_text(
            f'[server]\ndata_dir = "{tmp}"\nallowed_hosts = ["127.0.0.1"]\n'
            '[[deployments]]\nname = "echo"\nalgorithm = "algorithms.echo:Echo"\ndevice = "cpu"\n'
            f'[[upstreams]]\nname = "fake"\nbase_url = "http://127.0.0.1:{upstream_port}/v1"\n'
            'api_key_env = "BENCH_UPSTREAM_KEY"\nmodels = { "fake-gpt" = "fake-model" }\n'
        )

    def manage(self, *args: str) -> str:
        argv = [sys.executable, str(self.root / "manage.py"), *args]
        return subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, check=True).stdout

    def start(self) -> None:
        report.say(f"{self.label}: Redis, migrate, a key, a worker for cpu ({self.root})")
        self.children.append(processes.start_embedded_redis(self.tmp / "redis.sock", self.tmp / "logs" / "redis.log"))
        self.manage("migrate", "--noinput", "-v", "0")
        key = self.manage("createapikey", "--name", "web-cpu", "--quiet").strip().splitlines()[-1]
        self.spawn([str(self.root / "manage.py"), "runworker", "cpu", "--loglevel", "WARNING"], "worker")
        self.wait_for_worker()
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(self.root), key]
        log = open(self.tmp / "logs" / "django.log", "ab")  # noqa: SIM115 - the child owns it
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
        self.django = subprocess.Popen(argv, cwd=self.root, env=self.env, text=True, **pipes)
        self.children.append(self.django)

    def spawn(self, args: list[str], name: str) -> None:
        log = open(self.tmp / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.children.append(
            subprocess.Popen([sys.executable, *args], cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

    def wait_for_worker(self) -> None:
        import redis

        client = redis.Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + 120
        while not client.exists(internals.heartbeat_key("cpu")):
            if time.monotonic() > deadline or any(c.poll() is not None for c in self.children):
                raise RuntimeError(f"{self.label}: the worker did not come up; see {self.tmp / 'logs'}")
            time.sleep(0.1)

    def burst(self, name: str, count: int, mode: str = "time") -> dict:
        """`count` requests of path `name`: their CPU time, or (`mode` "count") the Python
        function calls they make, which no other process can disturb."""
        self.django.stdin.write(f"{mode}\t{name}\t{count}\n")
        self.django.stdin.flush()
        line = self.django.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the Django child died; see {self.tmp / 'logs'}")
        return json.loads(line)

    def stop(self) -> None:
        for process in reversed(self.children):
            processes.stop(process)


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True, capture_output=True
    )
    return into


def measure(checkouts: list[Checkout], bursts: int, count: int) -> dict[str, dict[str, list[float]]]:
    per_request: dict[str, dict[str, list[float]]] = {c.label: {name: [] for name in PATHS} for c in checkouts}
    for checkout in checkouts:  # warm-up: every path once, unmeasured
        for name in PATHS:
            checkout.burst(name, max(count // 5, 5))
    for index in range(bursts):
        for name in PATHS:
            for checkout in checkouts if index % 2 == 0 else reversed(checkouts):
                result = checkout.burst(name, count)
                if result["wrong"]:
                    raise RuntimeError(f"{checkout.label}: {result['wrong']} of {count} '{name}' answers were wrong")
                per_request[checkout.label][name].append(result["cpu_s"] * 1000 / count)
        report.say(f"burst {index + 1}/{bursts} done")
    return per_request


def count_calls(checkouts: list[Checkout], count: int) -> dict[str, dict[str, float]]:
    """Python function calls per request (C functions included), counted, not timed."""
    return {c.label: {name: c.burst(name, count, "count")["calls"] / count for name in PATHS} for c in checkouts}


def summarise(per_request: dict, calls: dict, old: str, new: str) -> list[dict]:
    rows = []
    for name in PATHS:
        best = {label: min(values[name]) for label, values in per_request.items()}
        median = {label: statistics.median(values[name]) for label, values in per_request.items()}
        rows.append(
            {
                "path": name,
                "best_ms": best,
                "median_ms": median,
                "best_ratio": best[new] / best[old],
                "median_ratio": median[new] / median[old],
                "calls_per_request": {label: calls[label][name] for label in calls},
                "calls_ratio": calls[new][name] / calls[old][name],
            }
        )
    return rows


def print_rows(rows: list[dict], old: str, new: str) -> None:
    header = ["path", f"{old} best", f"{new} best", "new/old", f"{old} median", f"{new} median", "new/old"]
    header += [f"{old} calls", f"{new} calls", "new/old"]
    table = [
        [
            row["path"],
            report.fmt(row["best_ms"][old], 3),
            report.fmt(row["best_ms"][new], 3),
            report.fmt(row["best_ratio"], 3),
            report.fmt(row["median_ms"][old], 3),
            report.fmt(row["median_ms"][new], 3),
            report.fmt(row["median_ratio"], 3),
            report.fmt(row["calls_per_request"][old], 0),
            report.fmt(row["calls_per_request"][new], 0),
            report.fmt(row["calls_ratio"], 3),
        ]
        for row in rows
    ]
    print("\nweb CPU ms per request, in-process (the child's process time per burst), and Python calls per request:")
    report.print_table(header, table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the commit to compare with (default HEAD)")
    parser.add_argument("--bursts", type=int, default=15)
    parser.add_argument("--requests", type=int, default=100, help="requests per burst")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "web_cpu.json")
    args = parser.parse_args()
    install_signal_handlers()
    with tempfile.TemporaryDirectory(prefix="dla-web-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        old_root = worktree(args.against, tmp / "old-checkout")
        port = free_port()
        fake = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port)])
        checkouts = [Checkout(args.against, old_root, tmp / "old", port), Checkout("this", ROOT, tmp / "new", port)]
        try:
            for checkout in checkouts:
                checkout.start()
            per_request = measure(checkouts, args.bursts, args.requests)
            calls = count_calls(checkouts, args.requests)
        finally:
            for checkout in checkouts:
                checkout.stop()
            processes.stop(fake)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)], check=False)
    rows = summarise(per_request, calls, args.against, "this")
    print_rows(rows, args.against, "this")
    result = {
        **report.result_head("web_cpu"),
        "config": {"against": args.against, "bursts": args.bursts, "requests_per_burst": args.requests},
        "paths": rows,
        "per_request_ms": per_request,
    }
    report.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
