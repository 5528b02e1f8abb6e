"""gunicorn settings for production: `gunicorn -c config/gunicorn.conf.py`.

The same flags as `djangollmapi.processes.gunicorn_argv` (what `manage.py serve`
runs), with workers, threads and the bind address read from the djangollmapi TOML
config in force ($DJANGO_LLM_API_CONFIG), so there is one source of truth: change
[server] web_workers / web_threads / host / port there, not here.

Why gthread (DESIGN.md, measured on the 2-core build machine): a bare Django
`async def` view under uvicorn cost ~4 ms p50 and topped out near 200 req/s (asgiref
starts threads for every request), while the same view as a sync view on gunicorn
gthread cost ~1 ms p50 and served 1,000-2,000 req/s. So the web tier is WSGI with
sync DRF/Django views, and each request that waits for a model (sync /api/, an SSE
stream, a chat completion) holds one thread blocked on Redis, which is cheap.
web_workers * web_threads is therefore how many clients may wait at once.
"""

import sys
from pathlib import Path

# gunicorn loads this file before it imports the app; make the project importable
# whatever the working directory is.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from djangollmapi.config import load_config  # noqa: E402

_server = load_config().server

wsgi_app = "djangollmapi.wsgi:application"
chdir = str(PROJECT_ROOT)

bind = [_server.bind]

# gthread, reading each request whole in the event loop before a thread takes it, and
# answering protocol errors as JSON (djangollmapi/webworker.py). Behind nginx, which
# buffers requests itself, it changes nothing but the error pages.
worker_class = "djangollmapi.webworker.BufferingThreadWorker"
workers = _server.web_workers
threads = _server.web_threads
# Open connections per worker (gthread's default is 1000): above the threads, so each
# thread can hold a waiting stream and keep-alive stays on.
worker_connections = _server.worker_connections

# With gthread the worker's main loop reports to the arbiter while request threads
# wait, so `timeout` only catches a wedged worker process; it does not cut off a
# request that waits for a job for longer (job_timeout_s, a deployment's timeout_s).
timeout = 60
# On SIGTERM / SIGHUP, requests in flight get this long to finish; waits and
# streams still open after it are cut. The web unit's TimeoutStopSec is above it.
graceful_timeout = 10
# nginx keeps idle upstream connections open for 4 s (config/nginx), below this, so
# it never reuses a connection gunicorn has just closed.
keepalive = 5

# Access and error log to stdout/stderr: systemd's journal collects them
# (journalctl -u djangollmapi-web).
accesslog = "-"
errorlog = "-"
# gunicorn's default line, with the client address nginx forwards instead of
# nginx's own, and the time taken in milliseconds at the end.
access_log_format = '%({x-forwarded-for}i)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'

# nginx on this host sets X-Forwarded-Proto; gunicorn trusts it only from these
# addresses and then reports https to Django (request.is_secure(), absolute URLs,
# CSRF origin checks in the admin). If nginx runs on another host, add its address.
forwarded_allow_ips = "127.0.0.1,::1"

# The app is imported in each worker after the fork, never in the arbiter: no Redis
# or database connection is shared between processes.
preload_app = False
