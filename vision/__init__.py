"""What training and inference share: decoding, preprocessing, model files and Grad-CAM.

`decode` and `preprocess` need only NumPy and Pillow; `modelio` and `gradcam` import
TensorFlow, so a process that will fork must not import them.
"""
import os

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI/BF16 or AMX; on an
# AVX2-only AMD EPYC they are off, and turning them on made the shipped model's forward + Grad-CAM
# 1.4x faster (86.3 against 61.1 scans/s at batch 64, bench/model.py). Set here, before anything imports
# TensorFlow; TF_ENABLE_ONEDNN_OPTS=0 in the environment still turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Under Keras's JAX backend a process would take 75% of a GPU's memory at start; like TensorFlow's memory growth,
# take it as needed, so several worker processes can share one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
