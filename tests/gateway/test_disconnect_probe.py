"""The disconnect probe behind cancelling abandoned streams, on real sockets."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from gateway.streaming import peer_closed

HIGH_FD = 1500  # past select()'s limit of 1024, as in a worker holding many streams


@pytest.fixture
def high_fd_pair():
    """A connected socket pair whose server end lives on a descriptor above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"the descriptor limit ({hard}) is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH_FD + 1), hard))
    server, client = socket.socketpair()
    os.dup2(server.fileno(), HIGH_FD)
    server.close()
    server = socket.socket(fileno=HIGH_FD)
    yield server, client
    for sock in (server, client):
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_open_connection_is_not_gone(high_fd_pair):
    server, _client = high_fd_pair
    assert not peer_closed(server)


def test_a_pipelined_request_is_not_mistaken_for_a_close(high_fd_pair):
    server, client = high_fd_pair
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert not peer_closed(server)
    assert server.recv(64) == b"GET / HTTP/1.1\r\n"  # peeking consumed nothing


def test_a_closed_peer_is_seen_at_once_even_above_fd_1024(high_fd_pair):
    server, client = high_fd_pair
    client.close()
    assert peer_closed(server)
