"""`--profile`: py-spy on the stack's processes while a load runs, and what it saw.

`profile_under_load` keeps a load running in a background thread, records py-spy
(`--nonblocking`, speedscope format) on each (label, pid) target, once per mode, and
summarises each recording (`summarise_speedscope`: self and inclusive shares per
function, self share per package, the inclusive share of the project's own functions).
Small recordings are copied to bench/results/ (git ignores them), big ones stay in
/tmp. Needs ptrace rights (root, or CAP_SYS_PTRACE). Open the files at
https://www.speedscope.app/.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from report import RESULTS_DIR, ROOT
from stack import Stack

# isort: split
# After `stack`, which puts the project root on sys.path.
from djangollmapi import processes

KEEP_MAX_BYTES = 1_000_000
ENTRY_POINTS = ("manage.py", "llmjobs/management/commands/runworker.py")
MODES = {
    # Threads the OS sees running (py-spy's default): includes time in C code that
    # released the GIL (SQLite commits, socket reads), and threads that are runnable
    # but waiting for a CPU on a busy machine.
    "active": [],
    # Only the thread holding the GIL: where Python-level CPU goes, and what the
    # threads of one gunicorn worker queue behind.
    "gil": ["--gil"],
}
MODE_MEANINGS = {
    "active": "threads not sleeping (py-spy default, --nonblocking)",
    "gil": "only the thread holding the GIL (--gil)",
}
ACTIVE = {"active": MODES["active"]}


def find_py_spy() -> Path | None:
    """py-spy next to this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


def profile_under_load(
    stack: Stack,
    targets: Sequence[tuple[str, int]],
    load: Callable[[threading.Event], Any],
    seconds: int,
    rate_hz: int,
    file_name: Callable[[str, str], str],
    modes: Mapping[str, list[str]] = ACTIVE,
    top: int = 15,
) -> tuple[dict[str, dict[str, dict]], dict]:
    """Run `load(stop)` in a thread (it returns when `stop` is set) and, for each mode
    in turn, py-spy every target at once for `seconds`. Returns ({label: {mode: entry}},
    `load_stats` of what `load` returned); an entry is the recording's summary, where it
    was kept, or an error. Raises RuntimeError when py-spy is not installed."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy not found")
    out_dir = Path(tempfile.mkdtemp(prefix="dla-bench-profile-"))
    stop = threading.Event()
    box: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: box.update(outcome=load(stop)), daemon=True)
    recorded: list[tuple[str, str, int, Path]] = []
    try:
        loader.start()
        time.sleep(1.0)  # connections open, steady state
        for mode, flags in modes.items():
            spies = []
            for label, pid in targets:
                path = out_dir / file_name(label, mode)
                spies.append(record(stack, py_spy, pid, seconds, rate_hz, path, flags))
                recorded.append((label, mode, pid, path))
            for spy in spies:
                finish(spy, seconds)
    finally:
        stop.set()
        loader.join(60)
        stack.children[:] = [(n, p) for n, p in stack.children if not n.startswith("py-spy")]
    entries: dict[str, dict[str, dict]] = {}
    for label, mode, pid, path in recorded:
        entry: dict[str, Any] = {"pid": pid}
        if not path.exists():
            entry["error"] = f"py-spy wrote nothing; see {path.with_suffix('.log')}"
        else:
            entry.update(summarise_speedscope(path, top))
            entry["speedscope"] = keep_profile(path)
            entry["speedscope_bytes"] = path.stat().st_size
        entries.setdefault(label, {})[mode] = entry
    kept = [str(e.get("speedscope", out_dir)) for by_mode in entries.values() for e in by_mode.values()]
    if not any(path.startswith(str(out_dir)) for path in kept):
        shutil.rmtree(out_dir, ignore_errors=True)  # everything worth keeping is in bench/results
    return entries, load_stats(box.get("outcome"))


def load_stats(outcome: Any) -> dict:
    """What the load (a `loadgen.Outcome`, or None) did while py-spy watched."""
    if outcome is None:
        return {"requests": 0, "ok": 0, "errors": 0, "requests_per_s_under_py_spy": None}
    ok = len(outcome.timings)
    return {
        "requests": outcome.attempted,
        "ok": ok,
        "errors": outcome.error_count,
        "requests_per_s_under_py_spy": round(ok / outcome.wall_s, 1) if outcome.wall_s else None,
    }


def record(
    stack: Stack, py_spy: Path, pid: int, seconds: int, rate_hz: int, path: Path, flags: list[str]
) -> subprocess.Popen:
    """Start `py-spy record` on `pid`, as one of the stack's children (stopped with it)."""
    argv = [str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate_hz)]
    argv += ["--format", "speedscope", "--output", str(path), "--nonblocking", *flags]
    spy = processes.spawn(argv, log_path=path.with_suffix(".log"))
    stack.children.append((f"py-spy {pid} {path.name}", spy))
    return spy


def finish(spy: subprocess.Popen, seconds: int) -> None:
    """py-spy that fell behind keeps sampling past its duration: interrupt it, which
    still writes what it has."""
    try:
        spy.wait(seconds * 3 + 30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            processes.stop(spy)


def keep_profile(path: Path) -> str:
    """Small profiles are copied next to the JSON (git ignores them); big ones stay in /tmp."""
    if path.stat().st_size >= KEEP_MAX_BYTES:
        return str(path)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = RESULTS_DIR / path.name
    shutil.copyfile(path, kept)
    return str(kept.relative_to(ROOT))


# ---------------------------------------------------------------- summaries


def package_of(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if file.startswith(str(ROOT) + "/"):
        return "app:" + file[len(str(ROOT)) + 1 :].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in file:
        rest = file.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    return file or "?"


def is_own_code(file: str) -> bool:
    """The project's code, less the venv inside it and the process entry points."""
    if "site-packages/" in file or not file.startswith(str(ROOT) + "/"):
        return False
    return not file.endswith(ENTRY_POINTS)


def short_file(file: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    if "/lib/python3" in file:
        return "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return file


def summarise_speedscope(path: Path, top: int = 15) -> dict:
    """Self and inclusive shares per function, self share per package, and the
    inclusive share of each of our own (project) functions: the request's stages."""
    data = json.loads(path.read_text())
    keys = [(f["name"], f.get("file") or "") for f in data["shared"]["frames"]]
    self_w: Counter = Counter()
    incl_w: Counter = Counter()
    pkg_w: Counter = Counter()
    total = 0.0
    threads = 0
    for profile in data["profiles"]:
        if not profile.get("samples"):
            continue
        threads += 1
        for stack, weight in zip(profile["samples"], profile["weights"], strict=False):
            if not stack:
                continue
            total += weight
            leaf = keys[stack[-1]]
            self_w[leaf] += weight
            pkg_w[package_of(leaf[1])] += weight
            for key in {keys[i] for i in stack}:
                incl_w[key] += weight

    def share(counter: Counter, own_only: bool = False) -> list[list]:
        rows = []
        for (name, file), w in counter.most_common():
            if own_only and not is_own_code(file):
                continue
            rows.append([round(100 * w / total, 1), f"{name} ({short_file(file)})"])
            if len(rows) >= top:
                break
        return rows

    return {
        "active_samples_s": round(total, 2),
        "threads_seen": threads,
        "self_top": share(self_w),
        "inclusive_top": share(incl_w),
        "own_code_inclusive": share(incl_w, own_only=True),
        "self_by_package": [[round(100 * w / total, 1), p] for p, w in pkg_w.most_common(top)] if total else [],
    }


def print_entries(titled: Iterable[tuple[str, dict]], packages: int, lists: Sequence[tuple[str, str, int]]) -> None:
    """Each recording's summary, under its title: its top packages (self time), then
    each (heading, key, rows) list of `summarise_speedscope`."""
    for title, entry in titled:
        print_entry(title, entry, packages, lists)


def print_entry(title: str, entry: dict, packages: int, lists: Sequence[tuple[str, str, int]]) -> None:
    if "error" in entry:
        print(f"\n  [{title}] {entry['error']}")
        return
    print(
        f"\n  [{title}] pid {entry['pid']}: {entry['active_samples_s']} thread-s sampled in "
        f"{entry['threads_seen']} threads ({entry['speedscope']})"
    )
    print("    self by package: " + ", ".join(f"{p} {s}%" for s, p in entry["self_by_package"][:packages]))
    for heading, key, rows in lists:
        if entry[key]:
            print(f"    {heading}:")
            for share, name in entry[key][:rows]:
                print(f"      {share:5.1f}%  {name}")
