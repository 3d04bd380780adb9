"""The Celery side of jobs: the app's settings, shared by producer and workers, and enqueueing by name.

`jobs/` never imports `worker/`; tasks are addressed by name.
"""
from __future__ import annotations

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as BrokerOperationalError
from kombu.utils.url import maybe_sanitize_url

from config import Settings

PROCESS_BATCH = "brainscan.process_batch"
SUBMIT_ARCHIVE = "brainscan.submit_archive"


class BrokerUnavailable(Exception):
    """The broker could not be reached after retrying."""


def celery_app(settings: Settings) -> Celery:
    """A Celery app configured for long, idempotent, at-least-once batches."""
    app = Celery("brainscan", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # never pickle: a message is data, not code
        result_serializer="json",
        task_ignore_result=True,  # the database holds results
        task_acks_late=True,  # ack after the batch is written, so a dead worker's batch is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds one batch at a time; the rest stay for others
        task_default_queue=settings.queue,
        # A dead worker's unacked batch is restored once visibility_timeout has passed. kombu looks for
        # such batches on every 10th 10-s tick by default (up to 100 s late); throttle 1 looks on every tick.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "unacked_restore_throttle": 1},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


def enqueue_batches(settings: Settings, job_id: int, groups: list[list[int]], app: Celery | None = None) -> int:
    """Send one task per batch of scan ids; returns the number of tasks sent."""
    app = app or celery_app(settings)
    try:
        with app.connection_for_write() as conn:
            for ids in groups:
                app.send_task(PROCESS_BATCH, args=[job_id, ids], queue=settings.queue, connection=conn,
                              retry=True, retry_policy={"max_retries": 5, "interval_start": 1,
                                                        "interval_step": 2, "interval_max": 10})
    except BrokerOperationalError as exc:
        raise BrokerUnavailable(f"broker {maybe_sanitize_url(settings.broker_url)} unreachable ({type(exc).__name__}); "
                                "check BROKER_URL and that Redis is up") from None
    return len(groups)


def queue_length(settings: Settings, app: Celery | None = None) -> int | None:
    """Messages waiting in the queue (not those a worker holds), or None if the broker can't say."""
    app = app or celery_app(settings)
    try:
        with app.connection_for_read() as conn:
            return conn.default_channel.queue_declare(settings.queue, passive=True).message_count
    except ChannelError as exc:
        # Redis deletes a list when its last message is popped, so "no such queue" means empty
        # (also right after a restart that lost everything). Other answers: not known.
        return 0 if "NOT_FOUND" in str(exc) else None
    except Exception:  # the broker may be restarting; the caller then just doesn't reconcile this round
        return None
