"""``alsub serve``: the API plus an embedded worker, no external server needed.

`serve` starts a worker subprocess (``python -m worker.main``) and runs the
API in this process with uvicorn. Without ``ALSUB_REDIS_URL`` both use the
data directory: Celery's filesystem transport and SQLite job records; with it,
Redis. ``--workers 0`` runs the API alone (the container deployment, where
``alsub worker`` runs elsewhere).

Run as ``python -m app.server [--host H] [--port P] [--data-dir DIR] [--workers N]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

__all__ = ["serve", "main"]

log = logging.getLogger("alsub.server")


def _warn_without_persistence(url: str) -> None:
    """Log `store.redis_backend.persistence_warning` of the Redis at ``url`` (if any)."""
    import redis

    from store.redis_backend import persistence_warning

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        message = persistence_warning(client)
    finally:
        client.close()
    if message:
        log.warning("%s", message)


class _EmbeddedWorker:
    """The worker subprocess of `serve`, restarted if it dies, stopped with the server."""

    def __init__(self, env: dict[str, str], before_spawn: Callable[[], object] = lambda: None):
        """``before_spawn`` runs before each start of the worker process (none alive)."""
        self.env = env
        self.before_spawn = before_spawn
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._supervise, name="supervisor", daemon=True)

    def _spawn(self) -> None:
        self.before_spawn()
        # Own process group, so stopping it also stops its pool children.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.main"], env=self.env, start_new_session=True
        )
        log.info("embedded worker started (pid %d)", self.process.pid)

    def _supervise(self) -> None:
        while not self._stopping.wait(1.0):
            if self.process is not None and self.process.poll() is not None:
                log.warning("embedded worker exited (%s); restarting", self.process.returncode)
                self._spawn()

    def start(self) -> None:
        self._spawn()
        self._watch.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.terminate()  # warm shutdown of the main process; it stops its children
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


def _exit_quietly(signum, frame) -> None:
    raise SystemExit(0)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> None:
    """Run the HTTP service (and, unless ``workers == 0``, an embedded worker) until stopped.

    Parameters
    ----------
    host, port : `str`, `int`
        Address the API listens on.
    data_dir : path or None
        Data directory (default ``ALSUB_DATA_DIR``, else ``./alsub-data``).
    workers : `int` or None
        Jobs run in parallel by the embedded worker (default ``ALSUB_WORKER_CONCURRENCY``);
        0 runs no worker.
    """
    import uvicorn

    from store import Settings, open_store
    from store.datadir import check_data_dir
    from store.redis_backend import check_redis
    from store.settings import missing_roots, unknown_variables
    from store.sweeper import release_running, requeue_all
    from worker.celery_app import clear_broadcasts

    from .main import create_app
    from .queue import JobQueue

    if data_dir is not None:
        os.environ["ALSUB_DATA_DIR"] = str(Path(data_dir).resolve())
    if workers:
        os.environ["ALSUB_WORKER_CONCURRENCY"] = str(workers)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for warning in unknown_variables(dict(os.environ)) + missing_roots(settings):
        log.warning("%s", warning)
    if settings.redis_url:
        check_redis(settings.redis_url)  # a refusal stops here, in one line (exit 2)
    check_data_dir(settings)  # unusable: one line naming ALSUB_DATA_DIR (exit 2)
    worker = None
    if workers != 0:
        if not settings.redis_url:
            # Nothing else uses this data directory's queue: put unfinished jobs back in it.
            store, queue = open_store(settings), JobQueue(settings)
            requeued = requeue_all(store.records, settings, queue.enqueue)
            if requeued:
                log.info("re-enqueued %d unfinished job(s)", len(requeued))
            queue.close()
        env = {**os.environ, "ALSUB_EMBEDDED_PARENT": str(os.getpid())}
        # its broker is this data directory's alone: the broadcast queues of workers gone
        worker = _EmbeddedWorker(env, partial(clear_broadcasts, settings))
        worker.start()
    log.info("alsub API on http://%s:%d (data in %s)", host, port, settings.data_dir)
    if settings.redis_url:
        _warn_without_persistence(settings.redis_url)
    if not settings.tokens:
        log.warning(
            "ALSUB_TOKENS is empty: the API serves every caller without authentication%s",
            "" if host in ("127.0.0.1", "localhost", "::1") else f" on {host}",
        )
    # uvicorn re-raises the SIGTERM it shut down on once it is done: with the default
    # handler the process ended there, and the worker's stop below never ran (the worker
    # left only as its parent died, its running job counted as a crash on restart)
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=5,
            # The app reads X-Forwarded-For itself, from ALSUB_TRUSTED_PROXIES only: uvicorn's
            # default trusts it from 127.0.0.1, which let a local client pick its address.
            proxy_headers=False,
        )
    finally:
        if worker is not None:
            worker.stop()
            if not settings.redis_url:  # its worker was the only one: its jobs wait for the next
                released = release_running(open_store(settings).records)
                if released:
                    log.warning("stopped with %d job(s) running: queued again", len(released))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (same options as ``alsub serve``)."""
    parser = argparse.ArgumentParser(
        prog="python -m app.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    serve(host=args.host, port=args.port, data_dir=args.data_dir, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
