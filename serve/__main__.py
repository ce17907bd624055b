"""Run the inference service: python -m serve configs/breast_ultrasound.yaml"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import uvicorn

from configs import load_config
from serve.app import UVICORN_OPTIONS, Settings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the registry's champion ONNX model over HTTP")
    parser.add_argument("config", type=Path, help="pipeline YAML: its registry and serve sections are used")
    parser.add_argument("--host", help="overrides serve.host")
    parser.add_argument("--port", type=int, help="overrides serve.port")
    args = parser.parse_args()
    config = load_config(args.config, check_paths=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # torch only resizes and normalises single images here, in many request threads at once;
    # its own thread pool per call would only fight ONNX Runtime's for the same cores.
    torch.set_num_threads(1)
    uvicorn.run(create_app(Settings.from_config(config)), host=args.host or config.serve.host,
                port=args.port or config.serve.port, log_level="info", **UVICORN_OPTIONS)


if __name__ == "__main__":
    main()
