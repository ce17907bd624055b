# medxfer on CUDA 13: training and ONNX Runtime use the GPU when the host passes one through
# (docker run --gpus all), and run on the CPU otherwise.
#
# The base and the wheels agree: requirements.lock installs torch 2.14.1+cu130 and
# onnxruntime-gpu 1.31.1 (CUDA 13, cuDNN 9), whose CUDA libraries come as nvidia-* pip
# wheels (libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcudnn.so.9). So the image
# needs no CUDA toolkit of its own: the `base` flavour of CUDA 13.0 (the container toolkit's
# settings and the driver requirement) is enough, and a cudnn/runtime base would only add a
# second copy of those libraries. Host driver: NVIDIA R580 or newer (>= 580.65.06, the
# driver of CUDA 13.0); the container toolkit refuses an older one (NVIDIA_REQUIRE_CUDA).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# requirements.lock is resolved for CPython 3.11; Ubuntu 24.04's python3 is 3.12. uv (the
# version the lock pins) installs a managed CPython 3.11, from which `make install` makes the venv.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ARG PYTHON_VERSION=3.11.7
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TORCH_HOME=/models/torch \
    UV_PYTHON_INSTALL_DIR=/opt/python
RUN apt-get update \
    && apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && uv python install ${PYTHON_VERSION}

WORKDIR /app
# What `make install` reads, then every package pyproject.toml installs
# (tests/test_dockerfile.py checks that these COPY lines cover them).
COPY pyproject.toml requirements.lock constraints.txt README.md Makefile prefect.yaml ./
COPY configs configs
COPY flows flows
COPY tasks tasks
COPY models models
COPY sample_data sample_data
COPY serve serve
RUN make install PYTHON="$(uv python find ${PYTHON_VERSION})"

# Air-gapped sites: mount ImageNet weights at $TORCH_HOME/hub/checkpoints, or a
# checkpoint named in the config with its sha256. Outputs land in /app/outputs.
# The service: docker run --gpus all -p 8000:8000 medxfer .venv/bin/python -m serve CONFIG --host 0.0.0.0
VOLUME ["/app/outputs", "/models"]
CMD ["make", "run"]
