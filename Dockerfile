# medxfer on a CUDA runtime: training and ONNX Runtime use the GPU when the host
# passes one through (docker run --gpus all), and run on the CPU otherwise.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TORCH_HOME=/models/torch
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md Makefile ./
COPY configs configs
COPY flows flows
COPY tasks tasks
COPY models models
COPY sample_data sample_data
RUN make install

# Air-gapped sites: mount ImageNet weights at $TORCH_HOME/hub/checkpoints, or a
# checkpoint named in the config with its sha256. Outputs land in /app/outputs.
VOLUME ["/app/outputs", "/models"]
CMD ["make", "run"]
