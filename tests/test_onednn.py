"""TensorFlow's oneDNN kernels are on unless the environment says otherwise (1.4x on AVX2-only CPUs)."""
import os
import subprocess
import sys

from tests.conftest import ROOT

PROBE = "import vision, os; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True).stdout


def test_importing_vision_turns_onednn_on():
    assert probe() == "1\n"


def test_an_explicit_setting_is_kept():
    assert probe(TF_ENABLE_ONEDNN_OPTS="0") == "0\n"
