"""The Celery application, configured from the service `Settings`.

Embedded deployment (no ``ALSUB_REDIS_URL``): Celery's filesystem transport
under ``<data_dir>/broker`` carries the job ids, so no server is needed; it
supports broadcast, so ``inspect ping`` and ``revoke`` work as with Redis.
Distributed deployment: Redis is the broker. Either way no result backend is
used: job state lives in the job records of the `store`.
"""

from __future__ import annotations

from celery import Celery

from store import Settings

__all__ = [
    "make_celery",
    "enqueue_job",
    "enqueue_callback",
    "clear_broadcasts",
    "RUN_TASK",
    "CALLBACK_TASK",
]

#: Registered names of the tasks (the API sends them by name, without importing core).
RUN_TASK = "alsub.run_subtraction_job"
CALLBACK_TASK = "alsub.deliver_callback"


def _broker(settings: Settings) -> tuple[str, dict]:
    if settings.redis_url:
        # Redelivery of an unacknowledged job must wait for the hard time limit.
        options: dict = {"visibility_timeout": settings.broker_visibility_timeout}
        if settings.broker_key_prefix:
            options["global_keyprefix"] = settings.broker_key_prefix
        return settings.redis_url, options
    folder = settings.data_dir / "broker"
    queue, control, processed = folder / "queue", folder / "control", folder / "processed"
    for path in (queue, control, processed):
        path.mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(control),
        "processed_folder": str(processed),
        "polling_interval": 0.2,
    }


def clear_broadcasts(settings: Settings) -> int:
    """Embedded (filesystem) broker, no worker running on it: forget every worker's
    broadcast queue and the messages waiting in them; returns how many were dropped.

    Each worker start binds a queue of its own (a new node name) to the broadcast exchange
    and nothing unbound it: every ping (``/readyz``) and cancel then wrote one file per
    worker ever started, never read, into the folder the job queue is listed from every
    0.2 s (a review: 18 files per three pings after six restarts). A starting worker binds
    its own again; the job queue's messages stay."""
    if settings.redis_url:
        return 0
    folder = settings.data_dir / "broker"
    (folder / "control" / "celery.pidbox.exchange").unlink(missing_ok=True)
    dropped = 0
    for path in (folder / "queue").glob("*.pidbox.msg"):
        path.unlink(missing_ok=True)
        dropped += 1
    return dropped


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (broker, queue, limits and acknowledgement policy).

    Parameters
    ----------
    settings : `store.Settings`

    Returns
    -------
    app : `celery.Celery`
        Without tasks; `worker.tasks` registers them on its own instance.
    """
    broker_url, transport_options = _broker(settings)
    app = Celery("alsub", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_routes={RUN_TASK: {"queue": settings.queue_name}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # Long jobs: acknowledge after the job, requeue when the worker process dies,
        # take one job at a time, and bound every job's run time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        worker_concurrency=settings.worker_concurrency,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_max_tasks_per_child=100,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def enqueue_job(app: Celery, settings: Settings, job_id: str) -> None:
    """Queue one subtraction job: the message carries only its id."""
    app.send_task(RUN_TASK, args=[job_id], queue=settings.queue_name)


def enqueue_callback(app: Celery, settings: Settings, job_id: str) -> None:
    """Queue the webhook delivery of a finished job's record."""
    app.send_task(CALLBACK_TASK, args=[job_id], queue=settings.queue_name)
