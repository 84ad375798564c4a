"""Health check of a worker container: does the worker on this host answer a Celery ping?

``python -m worker.health`` exits 0 when a worker whose node name ends with
``@<this hostname>`` (the ``alsub-<id>@%h`` names `worker.main` gives) answers
within the timeout and the data directory takes a file in every folder a job writes,
else 1 with the reason on stderr. Docker's HEALTHCHECK and
the compose file run it; in a container the hostname is the container's own.
"""

from __future__ import annotations

import socket
import sys

from store import Settings
from store.datadir import check_data_dir
from store.errors import SettingsError

__all__ = ["local_workers", "main"]


def local_workers(timeout: float) -> list[str]:
    """Names of the workers on this host that answer a ping within ``timeout`` seconds."""
    from .celery_app import make_celery

    app = make_celery(Settings())
    try:
        replies = app.control.inspect(timeout=timeout).ping() or {}
    finally:
        app.close()
    host = socket.gethostname()
    return sorted(name for name in replies if name.endswith(f"@{host}"))


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when a local worker answers; ``argv`` may give the timeout (seconds)."""
    args = sys.argv[1:] if argv is None else argv
    timeout = float(args[0]) if args else 3.0
    try:
        names = local_workers(timeout)
    except Exception as exc:  # broker unreachable: unhealthy, say why
        print(f"worker unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not names:
        print(f"worker unhealthy: no worker on {socket.gethostname()} answered", file=sys.stderr)
        return 1
    try:
        # a worker that answers pings but cannot write a product fails every job it takes
        check_data_dir(Settings())
    except SettingsError as exc:
        print(f"worker unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"worker healthy: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
