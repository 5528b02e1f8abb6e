"""Hosts for the multi-host test: Linux network namespaces joined by veth pairs to a
bridge the test makes (root only). Each namespace has its own loopback and sees only the
addresses made here, so a process in one reaches another "host" exactly as it would over
a network, and never the machine's own Redis or PostgreSQL on 127.0.0.1."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"


def run_ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=30)


@dataclass
class Network:
    """A bridge at `hub` (in the test's own namespace) and a namespace per host."""

    tag: str
    subnet: ipaddress.IPv4Network
    hosts: dict[str, str]  # host name -> its address

    @property
    def hub(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run on `host`: inside its namespace."""
        return [IP, "netns", "exec", self.namespace(host), *argv]

    def peers(self, host: str) -> set[str]:
        """The remote addresses of every TCP connection open on `host`."""
        listing = subprocess.run(
            self.argv(host, ["ss", "-Htn", "state", "established"]), capture_output=True, text=True, timeout=30
        ).stdout
        return {line.split()[-1].rsplit(":", 1)[0] for line in listing.splitlines() if line.strip()}


def make_network(tag: str, subnet: str, hosts: list[str]) -> Network:
    net = ipaddress.ip_network(subnet)
    network = Network(tag, net, {host: str(net.network_address + 10 + index) for index, host in enumerate(hosts)})
    run_ip("link", "add", network.bridge, "type", "bridge")
    run_ip("addr", "add", f"{network.hub}/{net.prefixlen}", "dev", network.bridge)
    run_ip("link", "set", network.bridge, "up")
    for index, (host, address) in enumerate(network.hosts.items()):
        namespace, outside, inside = network.namespace(host), f"{tag}v{index}h", f"{tag}v{index}n"
        run_ip("netns", "add", namespace)
        run_ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        run_ip("link", "set", inside, "netns", namespace)
        run_ip("link", "set", outside, "master", network.bridge, "up")
        run_ip("-n", namespace, "addr", "add", f"{address}/{net.prefixlen}", "dev", inside)
        run_ip("-n", namespace, "link", "set", inside, "up")
        run_ip("-n", namespace, "link", "set", "lo", "up")
    return network


def remove_network(network: Network) -> None:
    for host in network.hosts:
        with contextlib.suppress(subprocess.CalledProcessError):
            run_ip("netns", "del", network.namespace(host))  # takes its veth pair with it
    with contextlib.suppress(subprocess.CalledProcessError):
        run_ip("link", "del", network.bridge)


@contextlib.contextmanager
def hosts_network(tag: str, subnet: str, hosts: list[str]) -> Iterator[Network]:
    """The network for the test's duration; skips where namespaces cannot be made."""
    if os.geteuid() != 0 or not os.path.exists(IP):
        pytest.skip("network namespaces need root and iproute2's `ip`")
    remove_network(Network(tag, ipaddress.ip_network(subnet), dict.fromkeys(hosts, "")))  # a crashed run's leftovers
    network = make_network(tag, subnet, hosts)
    try:
        yield network
    finally:
        remove_network(network)
