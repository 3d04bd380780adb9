"""Shared fixtures: real scans, a tiny trained model, the shipped model, PostgreSQL, Redis, workers."""
from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from tests import services

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "scans"
SHIPPED_MODEL = ROOT / "models" / "brainscan-v1.keras"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A model trained by the project's own training code: 16 real scans, one epoch, 64 px."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny") / "tiny"
    train(TrainConfig(EXAMPLES, out, epochs=1, size=64, val_fraction=0.25,
                      cache_dir=tmp_path_factory.mktemp("cache"), command="pytest tiny model"))
    return out.with_suffix(".keras")


def report_tiny_model(tmp_path_factory) -> Path:
    """The project's training code on the 16 example scans, one epoch at 64 px; one per test session."""
    out = tmp_path_factory.getbasetemp() / "report-tiny-model" / "tiny"
    if not out.with_suffix(".keras").exists():
        from training.train import TrainConfig, train

        train(TrainConfig(EXAMPLES, out, epochs=1, size=64, batch_size=8, cache_dir=out.parent / "cache",
                          command="pytest tiny model"))
    return out.with_suffix(".keras")


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The committed default model (BRAINSCAN_TEST_MODEL overrides it while a new one trains)."""
    path = Path(os.environ.get("BRAINSCAN_TEST_MODEL") or SHIPPED_MODEL)
    assert path.is_file(), f"{path} missing: the shipped model must be committed"
    return path


def copy_examples(dest: Path) -> Path:
    shutil.copytree(EXAMPLES, dest)
    return dest


def make_scan_folder(dest: Path) -> Path:
    """The 16 real example scans in class folders, plus a truncated JPEG and an unlabelled scan."""
    folder = copy_examples(dest)
    data = (EXAMPLES / "glioma" / "Tr-gl_0207.jpg").read_bytes()
    (folder / "glioma" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "unsorted").mkdir()
    shutil.copy(EXAMPLES / "pituitary" / "Tr-pi_0956.jpg", folder / "unsorted" / "scan 1.jpg")
    return folder


@pytest.fixture
def scan_folder(tmp_path) -> Path:
    """The 16 real example scans in class folders, plus a truncated JPEG and an unlabelled scan."""
    return make_scan_folder(tmp_path / "archive")


def variant_folder(dest: Path, per_scan: int = 8) -> Path:
    """Distinct real scans (flips and rotations of the examples, as PNG) in class folders."""
    ops = [lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(90, expand=True),
           lambda im: im.rotate(180), lambda im: im.rotate(270, expand=True),
           lambda im: ImageOps.mirror(im.rotate(90, expand=True)), lambda im: ImageOps.flip(im.rotate(90, expand=True))]
    for src in sorted(EXAMPLES.glob("*/*.jpg")):
        (dest / src.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im.load()
            for i, op in enumerate(ops[:per_scan]):
                op(im).save(dest / src.parent.name / f"{src.stem}-v{i}.png")
    return dest


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session; fails when the server is unreachable."""
    url = services.fresh_database()
    yield url
    services.drop_database(url)


@pytest.fixture(scope="session")
def redis_url():
    services.require_redis()
    return f"{services.REDIS_URL}/0"


@pytest.fixture
def env_for(tmp_path, monkeypatch):
    """Set the brainscan environment for this test and return the Settings; also the env for subprocesses."""
    from config import load_settings

    def make(model: Path, database_url: str | None = None, broker_url: str | None = None, **extra):
        values = {"BRAINSCAN_VAR": str(tmp_path / "var"), "BRAINSCAN_MODEL": str(model),
                  "BRAINSCAN_QUEUE": f"test-{uuid.uuid4().hex[:8]}", **{k: str(v) for k, v in extra.items()}}
        if database_url:
            values["DATABASE_URL"] = database_url
        if broker_url:
            values["BROKER_URL"] = broker_url
        for key in ("DATABASE_URL", "BROKER_URL"):
            monkeypatch.delenv(key, raising=False)
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return load_settings(), {**os.environ, **values, "PYTHONPATH": str(ROOT)}

    return make


@pytest.fixture
def start_worker(tmp_path):
    """Start real `cli.py worker` processes; all are stopped at teardown."""
    started = []

    def start(env: dict) -> services.Worker:
        worker = services.Worker(env, tmp_path / f"worker{len(started)}.log").wait_ready()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_batch():
    """A random-weight net on the 16 real scans, its head set so that they fall into several classes."""
    import keras
    import numpy as np

    from training.architecture import GRADCAM_LAYER, build_model
    from vision.gradcam import Explainer
    from vision.preprocess import DEFAULTS, prepare_bytes

    keras.utils.set_random_seed(3)
    model = build_model(64, 4)
    scans = np.stack([prepare_bytes(p.read_bytes(), dict(DEFAULTS, size=64)).array
                      for p in sorted(EXAMPLES.glob("*/*.jpg"))])
    # Untrained pooled features barely differ between scans: standardise them inside the dense head.
    pooled = keras.Model(model.inputs, model.get_layer("gap").output)(scans).numpy()
    mean, std = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6
    directions = np.random.default_rng(0).normal(size=(pooled.shape[1], 4)).astype(np.float32)
    model.get_layer("logits").set_weights([directions / std[:, None], -(mean / std) @ directions])
    return Explainer(model, GRADCAM_LAYER), scans, model


def random_network(seed: int, stages=None, size: int = 64, pool: str = "avg"):
    """A random-weight net whose batch-norm statistics and head are random too, so that each maps."""
    import keras
    import numpy as np

    from training.architecture import GRADCAM_LAYER, build_model, stages_for
    from vision.gradcam import head_dense

    keras.utils.set_random_seed(seed)
    model = build_model(size, 4, stages=stages or stages_for(8), pool=pool)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    head = head_dense(model, GRADCAM_LAYER)
    head.set_weights([rng.normal(size=head.kernel.shape), rng.normal(size=head.bias.shape)])
    return model
