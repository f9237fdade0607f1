"""The Celery app: JSON only, at-least-once delivery, one queue per stage."""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from workers.settings import get_settings

STAGES = ("scan", "transcode", "media", "store")
"""Each stage runs on its own queue, so CPU-bound and network-bound workers scale apart."""

TASK_MODULES = ["tasks.scan", "tasks.transcode", "tasks.media", "tasks.store"]
"""Loaded by name when a worker starts (workers/ does not import tasks/)."""
WORKER_HOOK_MODULES = ["orchestration.worker_ledger"]
"""Also loaded by name in workers: they, not the client, record timings and outcomes in the job ledger."""

PRIORITY_LEVELS = 10
PRIORITIES = {"urgent": 0, "normal": 5, "batch": 9}
"""Redis transport priorities: kombu's Redis transport serves the LOWEST number first (0 before 9),
the opposite of RabbitMQ. A job's every task inherits the priority its first task was sent with."""


def _route(name: str, args, kwargs, options, task=None, **kw) -> dict | None:
    stage = name.split(".")[1] if name.startswith("discflow.") else None
    return {"queue": stage} if stage in STAGES else None


def create_app(broker_url: str | None = None) -> Celery:
    settings = get_settings()
    url = broker_url or settings.broker_url or "redis://127.0.0.1:6379/0"
    celery_app = Celery("discflow", broker=url, backend=url, include=TASK_MODULES + WORKER_HOOK_MODULES)
    celery_app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(stage) for stage in STAGES],
        task_default_queue="scan",
        task_routes=(_route,),
        task_track_started=True,
        result_expires=settings.result_expires_seconds,
        result_extended=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # Look for messages of vanished workers every 5 s (kombu's default is ~100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(PRIORITY_LEVELS)),
        },
        task_default_priority=PRIORITIES["normal"],
        task_inherit_parent_priority=True,  # a job's every task (canvas, chord body) keeps its priority
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=2000,
    )
    return celery_app


app = create_app()


def use_broker(url: str) -> None:
    """Point the app at another Redis (the embedded one, or a test's); drops cached connections."""
    app.conf.update(broker_url=url, result_backend=url)
    app._after_fork()  # forgets the connection and producer pools
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
