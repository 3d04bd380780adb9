"""The nightly scheduler: a Celery beat schedule that submits each configured archive root on a cron."""
from __future__ import annotations

from celery.schedules import crontab

from config import Settings
from jobs.queue import SUBMIT_ARCHIVE


def parse_cron(expression: str) -> crontab:
    """A five-field cron expression (minute hour day-of-month month day-of-week) as a Celery crontab."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"BRAINSCAN_SCHEDULE_CRON must have 5 fields, got {expression!r}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                   day_of_week=day_of_week)


def beat_schedule(settings: Settings) -> dict:
    """One entry per archive root: submit it as tonight's job."""
    schedule = parse_cron(settings.schedule_cron)
    return {f"nightly {root}": {"task": SUBMIT_ARCHIVE, "schedule": schedule, "args": [root],
                                "options": {"queue": settings.queue}}
            for root in settings.archives}


def start_beat(loglevel: str = "INFO") -> None:
    """Run Celery beat with the nightly schedule (run exactly one per deployment)."""
    from celery.apps.beat import Beat

    from worker.app import app, settings

    if not settings.archives:
        raise ValueError("BRAINSCAN_ARCHIVES is empty: nothing to schedule")
    app.conf.beat_schedule = beat_schedule(settings)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    Beat(app=app, loglevel=loglevel, schedule=str(settings.var_dir / "celerybeat-schedule")).run()
