"""CPU accounting from /proc: per process group, the machine, and everyone else.

`CpuMeter` wraps one measured case: CPU seconds of each process group the stack names
(`Stack.cpu_groups`; the bench client is this process), the machine's busy share, and
the share taken by processes that are not part of the benchmark (on a shared machine,
a large one means the timings are contaminated). `wait_for_quiet` waits for such a
machine to calm down before a case.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from report import say

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_sys_s(pid: int) -> float:
    """Kernel time only (syscalls: fsync, socket I/O, futex)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    return int(text[text.rindex(")") + 2 :].split()[12]) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


class CpuMeter:
    """CPU seconds per process group and the machine's busy share over one case."""

    def __init__(self, stack: Any | None) -> None:
        """`stack`: anything with `cpu_groups()` (a `stack.Stack`), or None for this process alone."""
        self.stack = stack

    def __enter__(self) -> CpuMeter:
        self.groups = self.stack.cpu_groups() if self.stack else {}
        self.before = {pid: proc_cpu_s(pid) for pids in self.groups.values() for pid in pids}
        self.before_sys = {pid: proc_sys_s(pid) for pids in self.groups.values() for pid in pids}
        self.client_before = time.process_time()
        self.machine_before = machine_cpu()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.client_s = time.process_time() - self.client_before
        busy1, total1 = machine_cpu()
        busy0, total0 = self.machine_before
        self.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
        self.load_after = os.getloadavg()[0]
        if self.stack:
            later = self.stack.cpu_groups()  # pool connections may have opened meanwhile
            for name, pids in later.items():
                self.groups[name] = sorted(set(self.groups.get(name, [])) | set(pids))
        self.sys_seconds = {
            name: sum(proc_sys_s(pid) - self.before_sys.get(pid, 0.0) for pid in pids)
            for name, pids in self.groups.items()
        }
        self.seconds = {
            name: sum(proc_cpu_s(pid) - self.before.get(pid, 0.0) for pid in pids) for name, pids in self.groups.items()
        }
        ours = sum(self.seconds.values()) + self.client_s
        machine_busy_s = (busy1 - busy0) / CLK_TCK
        machine_total_s = (total1 - total0) / CLK_TCK
        # CPU burnt by processes that are not part of this benchmark (other jobs on a
        # shared machine): when it is large, the timings are contaminated.
        self.foreign_share = max(0.0, machine_busy_s - ours) / max(1e-9, machine_total_s)

    def report(self, requests_done: int) -> dict:
        per_request = {name: 1000 * s / max(1, requests_done) for name, s in self.seconds.items()}
        per_request["bench client (this process)"] = 1000 * self.client_s / max(1, requests_done)
        return {
            "cpu_ms_per_request": {k: round(v, 4) for k, v in per_request.items()},
            "cpu_sys_ms_per_request": {
                name: round(1000 * s / max(1, requests_done), 4) for name, s in getattr(self, "sys_seconds", {}).items()
            },
            "machine_cpu_busy_share": round(self.machine_busy, 3),
            "other_processes_cpu_share": round(self.foreign_share, 3),
            "loadavg_1m_before_after": [round(self.load_before, 2), round(self.load_after, 2)],
        }


def merged_meters(meters: list[CpuMeter]) -> CpuMeter:
    """Several meterings of one case (`loadgen.merged`'s rounds) as one: CPU summed,
    the machine's busy share averaged, the share taken by other processes the worst
    round's (what says whether any of it was contaminated)."""
    total = CpuMeter(None)
    names = {name for meter in meters for name in meter.seconds}
    total.seconds = {name: sum(meter.seconds.get(name, 0.0) for meter in meters) for name in names}
    total.sys_seconds = {name: sum(meter.sys_seconds.get(name, 0.0) for meter in meters) for name in names}
    total.client_s = sum(meter.client_s for meter in meters)
    total.machine_busy = sum(meter.machine_busy for meter in meters) / len(meters)
    total.foreign_share = max(meter.foreign_share for meter in meters)
    total.load_before, total.load_after = meters[0].load_before, meters[-1].load_after
    return total


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """On a shared machine, wait (at most max_wait_s) until the whole machine is under
    `threshold` busy for a second while our stack idles; return the last busy share."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        share = (busy1 - busy0) / max(1, total1 - total0)
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                say(f"machine still {100 * share:.0f}% busy with other work; measuring anyway")
            return share
        say(f"machine {100 * share:.0f}% busy with other work; waiting for it to calm down")
        time.sleep(2.0)


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (gunicorn's workers, Celery's pool)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(p) for p in text.split()]
    except OSError:
        pass
    return sorted(set(found))
