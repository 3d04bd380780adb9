"""The Celery entry point: the app, its tasks, and the per-process model."""
