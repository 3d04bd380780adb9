"""The Celery app of the workers. Importing this never imports TensorFlow: children load it after fork."""
from __future__ import annotations

import logging
import os
import signal

from celery.signals import worker_process_init, worker_shutting_down

from config import load_settings
from jobs.queue import celery_app

settings = load_settings()
app = celery_app(settings)
app.conf.include = ["worker.tasks"]
# A pool process loads TensorFlow and the model in worker_process_init before it reports up. Celery's
# default wait for that is 4 s: on a busy CPU a replacement process (after one died on a scan) took
# longer, was killed, replaced, killed again... a crash loop. Give it the time a model load takes.
app.conf.worker_proc_alive_timeout = 300

RUNTIME = None
LOAD_ERROR: Exception | None = None
SHUTDOWN_EXITCODE: int | None = None
logger = logging.getLogger(__name__)


def gpu_ids() -> list[str]:
    """GPU indices this machine offers, without importing TensorFlow (nvidia-smi, or CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


@worker_process_init.connect
def load_model(**_) -> None:
    """In each pool process: pin one GPU (if any), open fresh DB connections, load and warm the model once."""
    global RUNTIME, LOAD_ERROR
    from billiard.process import current_process

    from db.session import dispose_engines
    from vision.runtime import Runtime

    gpus = gpu_ids()
    index = getattr(current_process(), "index", 0) or 0
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    dispose_engines()
    concurrency = int(os.environ.get("BRAINSCAN_WORKER_CONCURRENCY") or 1)
    threads = max(1, (os.cpu_count() or 1) // concurrency)
    try:
        RUNTIME = Runtime(settings.model_path, cpu_threads=threads, precision=settings.precision)
    except Exception as exc:  # whatever the cause, this process cannot classify
        # Celery logs and swallows an error raised here, and the process would go on taking tasks that all fail.
        # Stop the whole worker instead: SIGQUIT is Celery's cold shutdown, exit status 1, and the tasks it had
        # not acknowledged go back to the queue (their scans stay pending in the database).
        LOAD_ERROR = exc
        logger.critical("%s: stopping the worker", exc)
        os.kill(os.getppid(), signal.SIGQUIT)


@worker_shutting_down.connect
def remember_exitcode(exitcode=None, **_) -> None:
    """In the main process: keep the exit status the shutdown was announced with (1 for a cold shutdown)."""
    global SHUTDOWN_EXITCODE
    SHUTDOWN_EXITCODE = exitcode


def runtime():
    """The model of this worker process (loaded at process start)."""
    global RUNTIME
    if LOAD_ERROR is not None:
        raise LOAD_ERROR
    if RUNTIME is None:  # solo pool or a task run in-process: load on first use
        from vision.runtime import Runtime

        RUNTIME = Runtime(settings.model_path, precision=settings.precision)
    return RUNTIME


def start_worker(concurrency: int | None = None, loglevel: str = "INFO") -> None:
    """Run a prefork worker: one process per GPU, or one process using every core on CPU."""
    from vision.runtime import check_servable

    check_servable(settings.model_path, settings.precision)
    n = concurrency or max(1, len(gpu_ids()))
    os.environ["BRAINSCAN_WORKER_CONCURRENCY"] = str(n)
    app.worker_main(["worker", f"--loglevel={loglevel}", f"--concurrency={n}", "--pool=prefork",
                     "-Q", settings.queue, "--without-gossip", "--without-mingle"])
    # Celery announces a cold shutdown with exit status 1 but worker_main returns nothing and the process would
    # exit 0 (Celery 5.6): exit with the status announced.
    if SHUTDOWN_EXITCODE:
        raise SystemExit(SHUTDOWN_EXITCODE)
