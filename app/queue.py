"""The API's side of the queue: enqueue job ids, revoke, and ask workers if they are alive."""

from __future__ import annotations

import logging

from store import Settings
from worker.celery_app import enqueue_callback, enqueue_job, make_celery

__all__ = ["JobQueue"]

log = logging.getLogger("alsub.api")


class JobQueue:
    """Celery client used by the API (it never imports the tasks, only their names).

    Parameters
    ----------
    settings : `store.Settings`
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.celery = make_celery(settings)

    def enqueue(self, job_id: str) -> None:
        """Queue subtraction job ``job_id``."""
        enqueue_job(self.celery, self.settings, job_id)

    def enqueue_callback(self, job_id: str) -> None:
        """Queue the webhook delivery of ``job_id``."""
        enqueue_callback(self.celery, self.settings, job_id)

    def revoke(self, job_id: str) -> None:
        """Ask workers not to start ``job_id`` (best effort; the record state is authoritative)."""
        try:
            self.celery.control.revoke(job_id)
        except Exception:
            log.warning("revoke of %s failed", job_id, exc_info=True)

    def check_broker(self) -> None:
        """Raise when the broker cannot be reached."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=self.settings.readiness_timeout)
            if not self.settings.redis_url:
                # The filesystem transport "connects" always; what matters is a writable folder.
                folder = self.settings.data_dir / "broker" / "queue"
                probe = folder / ".probe"
                probe.write_bytes(b"")
                probe.unlink()

    def ping_workers(self) -> list[str]:
        """Names of the workers that answer within the readiness timeout and consume this
        deployment's queue (``queue_name``): a worker of another queue on the same broker
        takes none of its jobs (counted, it made /readyz say ready while jobs waited)."""
        inspect = self.celery.control.inspect(timeout=self.settings.readiness_timeout)
        replies = inspect.active_queues() or {}
        name = self.settings.queue_name
        return sorted(
            worker
            for worker, queues in replies.items()
            if any(queue.get("name") == name for queue in queues or [])
        )

    def close(self) -> None:
        """Release broker connections."""
        self.celery.close()
