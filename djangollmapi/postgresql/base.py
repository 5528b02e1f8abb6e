"""Django's PostgreSQL backend, lending from psycopg's pool only connections the
server has not closed.

After PostgreSQL restarts, every connection idle in a pool is dead, and the next
request (or worker job) that got one would fail. psycopg's own pool check cannot be
used for this: it costs a round trip per lend (~0.1 ms here), and after a failed
check it sleeps (1 s, then 2 s, ...) before the next try, so with a few dead
connections in the pool a request outwaits the pool's timeout anyway (503), and a
worker fails its job. Here a lend costs one non-blocking poll of the socket; a
socket with something to read (the server's "terminating connection" or its close)
is checked for real, and a dead one is dropped together with every other dead
connection in the pool at once, without a pause, then another is lent.
"""

from __future__ import annotations

import logging
import select

from django.db.backends.postgresql import base
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)


def closed_by_server(connection) -> bool:
    """True when the connection is closed, or its socket has something to read while
    idle and an empty query on it fails (an idle connection is sent nothing, short of
    the server's goodbye)."""
    if connection.closed:
        return True
    try:
        poller = select.poll()  # not select(): it fails on descriptors above 1024
        poller.register(connection.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
        ConnectionPool.check_connection(connection)  # an empty query: a notice passes, a FATAL raises
    except Exception:
        return True
    return False


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        if not self.pool:
            return connection
        # Each try either lends a live connection or removes a dead one from the pool
        # (with every other dead one it holds): bounded by what the pool can hold.
        for _ in range(self.pool.max_size + 1):
            if not closed_by_server(connection):
                return connection
            log.warning("the database closed a pooled connection (restarted?); replacing it and its dead peers")
            connection.close()
            self.pool.putconn(connection)  # closed: the pool discards it and opens another
            self.pool.check()  # drop the other dead ones now, not one request at a time
            connection = super().get_new_connection(conn_params)
        return connection
