"""Security: messages are data (no pickle), models load in safe mode and only with their card's SHA-256,
export writes only under --out, credentials are never printed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Job, Model, Result, Scan
from db.session import session_scope
from jobs.lifecycle import enqueue_job, new_job, open_database, wait
from jobs.queue import PROCESS_BATCH
from vision.errors import ModelError
from vision.modelio import load_model, read_card, write_card

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Sup3rSecretPw"
CARD = {"classes": ["glioma", "meningioma", "notumor", "pituitary"], "input_size": 64, "preprocessing": {},
        "gradcam_layer": "last_conv"}


class Touch:
    """Unpickling this creates a file: the proof that a pickled payload was deserialized."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (self.path.touch, ())


def fake_model(folder: Path) -> Path:
    """A model file with a valid card: enough to record jobs without TensorFlow."""
    path = folder / "fake.keras"
    path.write_bytes(b"model bytes that no test loads")
    write_card(path, CARD)
    return path


def cli(*args: str, env: dict, timeout: float = 180) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def clean_env(tmp_path: Path, **values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "BRAINSCAN_MODEL")}
    return {**env, "BRAINSCAN_VAR": str(tmp_path / "var"), "PYTHONPATH": str(ROOT), **values}


# --- the queue carries data, never code ---------------------------------------------------------------


@pytest.mark.slow
def test_a_pickled_task_message_is_refused_by_a_real_worker(tmp_path, scan_folder, shipped_model, pg_url, redis_url,
                                                            env_for, start_worker):
    from celery import Celery

    settings, env = env_for(shipped_model, pg_url, redis_url)
    worker = start_worker(env)
    job_id = new_job(settings, scan_folder)
    with session_scope(settings.database_url) as s:
        ids = list(s.scalars(select(Scan.id).where(Scan.job_id == job_id).order_by(Scan.id)))
    marker = tmp_path / "unpickled"

    # Someone who can write to the broker sends a real task, pickled, with a payload that acts when unpickled.
    attacker = Celery("attacker", broker=redis_url, set_as_current=False)
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle"])
    sent = attacker.send_task(PROCESS_BATCH, args=[job_id, ids], kwargs={"note": Touch(marker)},
                              queue=settings.queue, serializer="pickle")
    deadline = time.time() + 120
    while time.time() < deadline and "ContentDisallowed" not in worker.log.read_text():
        time.sleep(0.5)
    log = worker.log.read_text()

    assert "ContentDisallowed" in log and "untrusted content of type pickle" in log, log[-3000:]
    assert f"Task {PROCESS_BATCH}[{sent.id}] succeeded" not in log
    assert not marker.exists(), "the worker unpickled the message"
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(Scan.status, Scan.attempts).where(Scan.job_id == job_id)).all()
    assert {(status, attempts) for status, attempts in rows} == {("pending", 0)}, "the pickled task ran"

    # The same worker then serves the job's JSON messages: the refusal cost nothing but that message.
    enqueue_job(settings, job_id)
    p = wait(settings, job_id, timeout=300)
    assert (p.pending, p.done + p.failed) == (0, len(ids))
    assert not marker.exists()


# --- models: safe mode, and only the file the card describes ---------------------------------------------


def test_a_keras_model_with_a_lambda_layer_is_refused_in_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((64, 64, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="arbitrary_code")(inputs)
    x = keras.layers.Conv2D(4, 3, name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    write_card(path, CARD)  # the card is right: only the content is refused
    assert read_card(path)["sha256"]

    with pytest.raises(ModelError, match="cannot be loaded in safe mode") as err:
        load_model(path)
    assert "lambda" in str(err.value).lower()


def test_a_model_that_does_not_match_its_card_is_refused_with_a_clear_message(tmp_path):
    path = fake_model(tmp_path)
    with open(path, "ab") as fh:
        fh.write(b"tampered")

    with pytest.raises(ModelError, match="does not match its card") as err:
        load_model(path)
    assert "SHA-256" in str(err.value) and str(path) in str(err.value)

    code, out = cli("run", str(ROOT / "examples" / "scans"), env=clean_env(tmp_path, BRAINSCAN_MODEL=str(path)))
    assert code == 1 and "does not match its card" in out and "Traceback" not in out, out


# --- export writes under --out only -------------------------------------------------------------------------


HOSTILE_PATHS = ["../../evil", "a/../../../evil-b", "/tmp/brainscan-evil-{uid}/abs", "heatmaps/../../evil-c",
                 "../overlays/../../evil-d", "nul\x00/../../evil-e"]


def hostile_job(url: str, folder: Path, paths: list[str]) -> int:
    """A job whose scan rows (as a tampered database could hold) point outside any export folder."""
    model_sha = "f" * 64
    with session_scope(url) as s:
        s.add(Model(sha256=model_sha, name="fake", path="fake.keras", card=CARD))
        job = Job(folder=str(folder), model_sha256=model_sha, batch_size=32, total=len(paths), status="complete")
        s.add(job)
        s.flush()
        for i, path in enumerate(paths):
            result = Result(sha256=f"{i:064x}", model_sha256=model_sha, predicted_label="glioma",
                            probabilities=[0.7, 0.1, 0.1, 0.1], heatmap=bytes(16), heatmap_height=4,
                            heatmap_width=4, geometry={"box": [0, 0, 8, 8], "width": 8, "height": 8})
            s.add(result)
            s.flush()
            s.add(Scan(job_id=job.id, path=path, sha256=result.sha256, size=1, status="done", result_id=result.id,
                       attempts=1))
        return job.id


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("hostile", HOSTILE_PATHS)
def test_export_never_writes_outside_out_whatever_the_database_says(tmp_path, monkeypatch, hostile):
    from config import load_settings
    from jobs.export import ExportError, export_job

    uid = uuid.uuid4().hex[:8]
    hostile = hostile.format(uid=uid)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    open_database(load_settings())
    archive = tmp_path / "a" / "b" / "archive"
    archive.mkdir(parents=True)
    out = tmp_path / "a" / "b" / "out"
    job_id = hostile_job(url, archive, [hostile])
    before = tree(tmp_path)

    with session_scope(url) as s, pytest.raises(ExportError, match="refusing to write"):
        export_job(s, job_id, out)
    code, output = cli("export", str(job_id), "--out", str(out), env=clean_env(tmp_path, DATABASE_URL=url))

    assert code == 1 and "refusing to write" in output and "Traceback" not in output, output
    written_outside = {p for p in tree(tmp_path) - before if p != "a/b/out" and not p.startswith("a/b/out/")}
    assert written_outside == set()
    assert not Path(f"/tmp/brainscan-evil-{uid}").exists()
    assert {p.name for p in out.rglob("*.png")} == set()


# --- credentials come from the environment and are never printed --------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["status", "--format", "json"], ["report"],
                                     ["report", "--format", "json"], ["jobs"]])
def test_a_database_password_is_never_printed(tmp_path, command):
    env = clean_env(tmp_path, DATABASE_URL=f"postgresql://brainscan:{PASSWORD}@127.0.0.1:1/brainscan")
    code, out = cli(*command, env=env)

    assert code == 1
    assert PASSWORD not in out
    assert "127.0.0.1:1" in out and "unreachable" in out and "Traceback" not in out, out


@pytest.mark.slow
def test_a_broker_password_is_never_printed(tmp_path):
    env = clean_env(tmp_path, BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:1/0",
                    BRAINSCAN_MODEL=str(fake_model(tmp_path)))
    code, out = cli("submit", str(ROOT / "examples" / "scans"), env=env)

    assert code == 1
    assert PASSWORD not in out
    assert "127.0.0.1:1" in out and "unreachable" in out and "Traceback" not in out, out
    assert "job 1 is recorded: run `python cli.py resume 1` once the broker is up" in out
