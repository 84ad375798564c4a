"""Entry point of a worker process: ``alsub worker`` / ``python -m worker.main``.

Extra arguments are passed to ``celery worker`` (e.g. ``--concurrency 4``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

__all__ = ["run_worker"]


def run_worker(argv: list[str] | None = None) -> int:
    """Run a Celery worker for the alsub queue until it is stopped.

    Parameters
    ----------
    argv : `list` of `str` or None
        Extra ``celery worker`` arguments; they override the defaults
        (queue, concurrency and log level from the ``ALSUB_*`` settings).

    Returns
    -------
    status : `int`
        Exit status (0 on a clean shutdown).
    """
    from store import Settings
    from store.datadir import check_data_dir

    # before worker.tasks, whose Celery app creates the local broker's folders in it
    check_data_dir(Settings())
    from .tasks import app, settings
    from .threads import node_name

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(processName)s: %(message)s",
    )
    if not os.environ.get("ALSUB_EMBEDDED_PARENT"):  # else `alsub serve` said it already
        from store.settings import unknown_variables

        for warning in unknown_variables(dict(os.environ)):
            logging.getLogger("alsub.worker").warning("%s", warning)
    if settings.redis_url:
        from store.redis_backend import check_redis

        check_redis(settings.redis_url)
    if not settings.redis_url and not os.environ.get("ALSUB_EMBEDDED_PARENT"):
        # a worker meant for Redis but started without it waited on a local queue that no
        # API fed, reporting ready (an operator's review)
        logging.getLogger("alsub.worker").warning(
            "ALSUB_REDIS_URL is not set: taking jobs from the local broker in %s, which only "
            "an `alsub serve` with that ALSUB_DATA_DIR feeds; set ALSUB_REDIS_URL to take "
            "them from Redis",
            settings.data_dir,
        )
    args = [
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        settings.queue_name,
        "--concurrency",
        str(settings.worker_concurrency),
        # Unique node name, so several workers on one host answer pings separately; it
        # names the machine too, so that workers in containers side by side share its cores.
        "--hostname",
        node_name(),
        "--without-mingle",
        "--without-gossip",
        *(argv or []),
    ]
    _exit_with_parent()
    try:
        app.worker_main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _exit_with_parent() -> None:
    """Embedded worker: stop when the ``alsub serve`` process that started it is gone."""
    parent = os.environ.get("ALSUB_EMBEDDED_PARENT")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown first...
        time.sleep(15.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # ...then no orphans, whatever it was doing

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:]))
