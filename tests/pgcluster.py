"""A throwaway PostgreSQL cluster for the tests that stop a database or put it on an
address of their own: `initdb` / `pg_ctl` on a free port and a temp dir, never the
machine's own PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest

COMMAND_TIMEOUT_S = 120


def postgres_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass
class Cluster:
    """A cluster run as `postgres` when the tests run as root, listening on `host`."""

    bin: Path
    root: Path
    port: int
    as_user: list[str]
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/dla"

    def run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            check=True,
            timeout=COMMAND_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        if self.host != "127.0.0.1":  # initdb trusts loopback only; it listens on nothing else
            with open(self.data / "pg_hba.conf", "a") as rules:
                rules.write("host all all 0.0.0.0/0 trust\n")
        self.start()
        self.run("createdb", "-h", self.host, "-p", str(self.port), "-U", "postgres", "dla")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses={self.host} -k {self.root} -c fsync=off"
        log = str(self.root / "postgres.log")
        self.run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")


@contextlib.contextmanager
def private_cluster(port: int, host: str = "127.0.0.1") -> Iterator[Cluster]:
    """A new cluster with a database `dla`, removed afterwards; skips the test when
    this machine has no PostgreSQL server binaries (or, as root, no postgres user)."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="dla-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to run the cluster as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    made = Cluster(binaries, root, port, as_user, host)
    try:
        made.init()
        yield made
    finally:
        with contextlib.suppress(Exception):
            made.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
