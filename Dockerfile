# syntax=docker/dockerfile:1
#
# One image recipe for CPU and GPU. The only difference is the TensorFlow package:
#   CPU (default):  docker build -t brainscan:cpu .
#   GPU:            docker build -t brainscan:gpu --build-arg TF_PACKAGE='tensorflow[and-cuda]' .
# The version stays pinned in requirements.txt alone: its `tensorflow-cpu==X` line becomes
# `${TF_PACKAGE}==X`. The CUDA libraries come as pip wheels with tensorflow[and-cuda]; the host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim-bookworm

ARG TF_PACKAGE=tensorflow-cpu
ARG FLOWER_VERSION=2.2.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    BRAINSCAN_VAR=/var/lib/brainscan

WORKDIR /app

COPY requirements.txt ./
RUN set -eu; \
    sed "s/^tensorflow-cpu==/${TF_PACKAGE}==/" requirements.txt > /tmp/requirements.txt; \
    grep -qF "${TF_PACKAGE}==" /tmp/requirements.txt \
      || { echo "requirements.txt has no tensorflow-cpu==VERSION line to swap" >&2; exit 1; }; \
    pip install -r /tmp/requirements.txt "flower==${FLOWER_VERSION}"; \
    rm /tmp/requirements.txt

# Unprivileged user; the var volume inherits this directory's owner on first mount.
RUN useradd --create-home --uid 10001 brainscan \
    && mkdir -p /var/lib/brainscan /app/models \
    && chown brainscan:brainscan /var/lib/brainscan

COPY . .

USER brainscan
# Models are mounted at /app/models (see docker-compose.yml); BRAINSCAN_MODEL defaults to
# /app/models/brainscan-v1.keras.
CMD ["python", "cli.py", "--help"]
