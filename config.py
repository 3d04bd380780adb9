"""Settings, read from the environment once per process.

Nothing here imports TensorFlow, SQLAlchemy or Celery, so every layer may import it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "models" / "brainscan-v1.keras"


# How a worker serves the model (vision.precision): auto is mixed bfloat16 where the CPU runs it natively;
# int8 serves the quantized file `cli.py quantize` writes beside the model (vision.int8), on the CPU.
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "int8")


class SettingsError(ValueError):
    """An environment variable holds a value brainscan cannot use."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, the first being the default."""
    raw = os.environ.get(name) or choices[0]
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _paths(name: str) -> tuple[str, ...]:
    """A list of paths separated by commas or os.pathsep, blanks dropped."""
    raw = os.environ.get(name) or ""
    return tuple(p.strip() for p in raw.replace(os.pathsep, ",").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Every knob brainscan reads; see .env.example for the variable of each."""

    var_dir: Path
    database_url: str
    broker_url: str | None
    model_path: Path
    batch_size: int
    max_attempts: int
    lease_seconds: int
    visibility_timeout: int
    local_workers: int
    queue: str
    schedule_cron: str
    archives: tuple[str, ...]
    precision: str = "auto"

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: `run` processes jobs locally."""
        return not self.broker_url


def load_settings() -> Settings:
    """Build Settings from the environment, with the embedded defaults."""
    var_dir = Path(os.environ.get("BRAINSCAN_VAR", ROOT / "var"))
    return Settings(
        var_dir=var_dir,
        database_url=os.environ.get("DATABASE_URL") or f"sqlite:///{var_dir / 'brainscan.db'}",
        broker_url=os.environ.get("BROKER_URL") or None,
        model_path=Path(os.environ.get("BRAINSCAN_MODEL") or DEFAULT_MODEL),
        batch_size=_int("BRAINSCAN_BATCH_SIZE", 32),
        max_attempts=_int("BRAINSCAN_MAX_ATTEMPTS", 3),
        # A lease must outlive the slowest batch (32 scans: ~1 s on 2 CPU cores) and is what a
        # redelivered batch waits for when its first worker vanished without a trace.
        lease_seconds=_int("BRAINSCAN_LEASE_SECONDS", 120),
        visibility_timeout=_int("BRAINSCAN_VISIBILITY_TIMEOUT", 3600),
        local_workers=_int("BRAINSCAN_LOCAL_WORKERS", 1),
        queue=os.environ.get("BRAINSCAN_QUEUE") or "brainscan",
        # The nightly scheduler (`cli.py beat`) submits every archive root on this cron expression.
        schedule_cron=os.environ.get("BRAINSCAN_SCHEDULE_CRON") or "0 1 * * *",
        archives=_paths("BRAINSCAN_ARCHIVES"),
        precision=_choice("BRAINSCAN_PRECISION", PRECISIONS),
    )
