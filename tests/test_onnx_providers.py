"""ONNX Runtime's CUDA provider finds the nvidia wheels' libraries, and what is reported as the
provider is the one the session really runs on.

There is no GPU here: these tests ask for CUDA as a GPU host would and check what can be
checked on a CPU: that the wheels' CUDA libraries are preloaded (ONNX Runtime's own
`preload_dlls`, really called, watched by a wrapper), and that the export check and the
service report the provider of the session (CPU, after ONNX Runtime's fallback), never the
one asked for. On a GPU host the same tests see CUDA and pass with it.
"""

from __future__ import annotations

import logging

import httpx
import onnxruntime as ort
import pytest
import torch

from configs import ServeConfig
from serve.app import Settings, create_app
from tasks import export
from tasks.export import CPU_PROVIDER, CUDA_PROVIDER, TRT_PROVIDER, open_session
from tests.live_server import LiveServer


@pytest.fixture
def preloads(monkeypatch) -> list[int]:
    """Each real call of onnxruntime.preload_dlls, counted, with the once-per-process cache reset."""
    calls: list[int] = []
    real = ort.preload_dlls

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "preload_dlls", counted)
    export.preload_cuda_libraries.cache_clear()
    yield calls
    export.preload_cuda_libraries.cache_clear()


def test_a_cuda_session_preloads_the_wheels_libraries_and_reports_the_provider_it_runs_on(
        champion_registry, preloads, caplog):
    _, _, onnx_path = champion_registry
    with caplog.at_level(logging.WARNING, logger="tasks.export"):
        session = open_session(onnx_path, [CUDA_PROVIDER, CPU_PROVIDER])
        open_session(onnx_path, [CUDA_PROVIDER, CPU_PROVIDER])
    assert len(preloads) == 1  # once per process
    running = session.get_providers()[0]
    if running != CUDA_PROVIDER:  # no GPU: ONNX Runtime fell back, and says so through us
        assert running == CPU_PROVIDER
        assert f"ONNX Runtime could not use {CUDA_PROVIDER}; the session runs on {CPU_PROVIDER}" in caplog.messages


def test_a_cpu_session_does_not_load_cuda_libraries(champion_registry, preloads):
    _, _, onnx_path = champion_registry
    assert open_session(onnx_path, [CPU_PROVIDER]).get_providers()[0] == CPU_PROVIDER
    assert preloads == []


def test_the_service_reports_the_provider_its_session_runs_on(champion_registry, preloads, monkeypatch):
    # Mocked: only the hardware probe, since this machine has no GPU. The service then asks
    # ONNX Runtime for TensorRT and CUDA as on a GPU host; everything after that is real.
    has_gpu = torch.cuda.is_available()
    monkeypatch.setattr(export, "gpu_available", lambda: True)
    config, _, _ = champion_registry
    server = LiveServer(create_app(Settings(config.registry.tracking_uri, config.registry.model_name,
                                            ServeConfig(reload_seconds=600), api_key=None)))
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=60).json()
    finally:
        server.stop()
    assert len(preloads) == 1
    if has_gpu:
        assert ready["model"]["provider"] in (TRT_PROVIDER, CUDA_PROVIDER)
    else:  # asked for TensorRT and CUDA, fell back: /readyz says CPU, as the session does
        assert ready["model"]["provider"] == CPU_PROVIDER
