"""The worker's model runs on any Keras backend: the shipped model under JAX serves what it serves under TensorFlow."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import EXAMPLES, ROOT

EXPLAIN = """
import json, sys
from pathlib import Path
import numpy as np
import keras
from vision.preprocess import prepare_bytes
from vision.runtime import Runtime

# float32: backends agree to 1e-5 there; bfloat16 (auto on some CPUs) rounds differently in each
rt = Runtime(sys.argv[1], precision="float32")
paths = sorted(Path(sys.argv[2]).glob("*/*.jpg"))[:13]
scans = np.stack([prepare_bytes(p.read_bytes(), rt.preprocessing).array for p in paths])
probs, cams = rt.explain(scans)
np.savez(sys.argv[3], probs=probs, cams=cams)
print(json.dumps({"backend": keras.backend.backend(), "gpus": rt.gpus, "pads": rt.explainer.pads}))
"""


def explain_with(backend: str, model, out) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", EXPLAIN, str(model), str(EXAMPLES), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_shipped_model_gives_the_same_probabilities_and_maps_on_jax_as_on_tensorflow(shipped_model, tmp_path):
    # 13 scans: under JAX (XLA) the batch runs padded to 16, under TensorFlow on a CPU as it is.
    runs = {b: explain_with(b, shipped_model, tmp_path / f"{b}.npz") for b in ("tensorflow", "jax")}
    tf_out, jax_out = (np.load(tmp_path / f"{b}.npz") for b in ("tensorflow", "jax"))

    assert runs == {"tensorflow": {"backend": "tensorflow", "gpus": [], "pads": False},
                    "jax": {"backend": "jax", "gpus": [], "pads": True}}
    assert list(jax_out["probs"].argmax(axis=1)) == [0] * 4 + [1] * 4 + [2] * 4 + [3]
    assert jax_out["cams"].shape == (13, 20, 20)
    np.testing.assert_allclose(jax_out["probs"], tf_out["probs"], atol=1e-5)
    np.testing.assert_allclose(jax_out["cams"], tf_out["cams"], atol=1e-5)
