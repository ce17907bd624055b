"""The HTTP API: POST /v1/predict, GET /healthz, GET /readyz.

The champion is polled every `serve.reload_seconds`; a new version is loaded
beside the old one and swapped in with one assignment, so requests already in
a batch finish on the model they started with and none is dropped.

A request body is one file's fault boundary: whatever decoding it raises is
answered with the 4xx its reject kind maps to (`STATUS_FOR_KIND`), never a 5xx,
and logged as one line (a traceback only at DEBUG). Decodes run at most
`serve.decode_slots` at a time and a batch holds crops, not decoded images,
which bounds memory under concurrent maximum-size requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from configs import DomainPolicy, PipelineConfig, ServeConfig
from serve.batching import MicroBatcher
from tasks.champion import Prediction, ServedModel, champion_version, load_champion
from tasks.decode import DEFAULT_LIMITS, DecodeLimits
from tasks.dicom_results import ModelIdentity, NotReferenceable, result_sr_for
from tasks.domain import ImageFacts
from tasks.export import GPU_PROVIDERS, choose_providers
from tasks.formats import detect_format
from tasks.ingest import read_dicom_header
from tasks.preprocess import resolve_workers
from tasks.rejects import RejectKind, UnreadableImage, exception_detail

log = logging.getLogger("medxfer.serve")

API_KEY_HEADER = "X-API-Key"
DICOM_TYPE = "application/dicom"
ACCEPTED_TYPES = (DICOM_TYPE, "image/png", "image/jpeg")
MODEL_NAME_ENV = "MEDXFER_MODEL_NAME"
REQUEST_NAME = Path("request body")  # what decode errors name instead of a file
# uvicorn's C event loop and HTTP parser, asked for by name so that a missing one fails at
# start instead of falling back to h11 and asyncio, which cost 1.3 ms of CPU per request more.
UVICORN_OPTIONS = {"loop": "uvloop", "http": "httptools"}
# The status a request gets for its body's reject kind; any other kind 422. Never a 5xx:
# a body that cannot be read is the caller's to fix, and one bad body must not end the
# keep-alive connection it came on (uvicorn closes it after a 500).
STATUS_FOR_KIND = {
    RejectKind.EMPTY: 400, RejectKind.NOT_AN_IMAGE: 400, RejectKind.CORRUPT: 400, RejectKind.TRUNCATED: 400,
    RejectKind.TOO_LARGE: 413,
    RejectKind.UNSUPPORTED_SYNTAX: 415, RejectKind.DECODER_LIMITATION: 415,
    RejectKind.NO_PIXEL_DATA: 422, RejectKind.BAD_GEOMETRY: 422, RejectKind.UNEXPECTED: 422,
    RejectKind.OUT_OF_DOMAIN: 422,  # under domain.policy: refuse
}


@dataclass(frozen=True)
class Settings:
    tracking_uri: str
    model_name: str
    serve: ServeConfig
    api_key: str | None  # None: no key required
    limits: DecodeLimits = DEFAULT_LIMITS  # preprocess.max_pixels / max_frames, checked before decoding
    domain_policy: DomainPolicy = DomainPolicy.FLAG  # out-of-domain inputs: answered with the flag, or 422

    @classmethod
    def from_config(cls, config: PipelineConfig) -> "Settings":
        """The config's registry, serve, decode limits and domain policy (configs.TRACKING_URI_ENV
        names another registry); the environment can name another model, and holds the API key."""
        return cls(
            tracking_uri=config.registry.tracking_uri,
            model_name=os.environ.get(MODEL_NAME_ENV) or config.registry.model_name,
            serve=config.serve,
            api_key=os.environ.get(config.serve.api_key_env) or None,
            limits=DecodeLimits.from_config(config.preprocess),
            domain_policy=config.domain.policy,
        )


def wants_dicom_result(accept: str) -> bool:
    """`Accept: application/dicom` (and not application/json): answer with the DICOM SR."""
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return DICOM_TYPE in types and "application/json" not in types


def _rejected(kind: RejectKind, detail: str, content_type: str, **fields) -> JSONResponse:
    """The answer to a body that is not used: its kind's status, the kind, one line, and
    `fields` (the domain verdict of a refused image), which the one log line leaves out."""
    status = STATUS_FOR_KIND.get(kind, 422)
    log.info("rejected a %s body (%s, %d): %s", content_type, kind.value, status, detail)
    return JSONResponse({"detail": detail, "kind": kind.value, **fields}, status_code=status)


def _unreadable(exc: UnreadableImage, content_type: str) -> JSONResponse:
    return _rejected(exc.kind, f"cannot read the {content_type} body: {exc.detail}", content_type)


def session_threads(concurrent_batches: int, cores: int, on_gpu: bool) -> int | None:
    """The served session's ONNX Runtime threads, so that `concurrent_batches` batches at once
    use each core once; None (the runtime's own choice, one per physical core) for one batch
    at a time, and on a GPU."""
    return None if on_gpu or concurrent_batches == 1 else max(1, cores // concurrent_batches)


class Service:
    """The served model, its batcher and the reload loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model: ServedModel | None = None
        self.load_error: str | None = None
        self.reloads = 0
        self._download_dir = Path(tempfile.mkdtemp(prefix="medxfer-serve-"))
        lanes = settings.serve.concurrent_batches
        self.session_threads = session_threads(lanes, resolve_workers(None), choose_providers()[0] in GPU_PROVIDERS)
        self.batcher = MicroBatcher(self._predict, settings.serve.max_batch,
                                    settings.serve.batch_window_ms / 1000, lanes)
        self.decode_slots = asyncio.Semaphore(resolve_workers(settings.serve.decode_slots))

    @staticmethod
    def _predict(requests: Sequence[tuple[ServedModel, np.ndarray, ImageFacts]]) -> list[tuple[Prediction, ServedModel]]:
        """Each request's crop runs on the model that prepared it, so a reload while requests
        are in flight never mixes one model's preprocessing with another's network: one
        network call per model in the batch (one model but for a moment after a swap)."""
        answers: list[tuple[Prediction, ServedModel] | None] = [None] * len(requests)
        for model in {id(model): model for model, _, _ in requests}.values():
            indices = [i for i, (owner, _, _) in enumerate(requests) if owner is model]
            crops = [requests[i][1] for i in indices]
            facts = [requests[i][2] for i in indices]
            for index, prediction in zip(indices, model.predict(crops, facts)):
                answers[index] = (prediction, model)
        return answers

    def _load(self) -> None:
        s = self.settings
        self.model = load_champion(s.tracking_uri, s.model_name, s.serve.variant, self._download_dir, s.limits,
                                   self.session_threads)
        self.load_error = None

    async def reload_if_moved(self) -> bool:
        """Load the champion if the alias points at a version other than the one served."""
        s = self.settings
        try:
            version = await asyncio.to_thread(champion_version, s.tracking_uri, s.model_name)
            if self.model is not None and version == self.model.version:
                return False
            previous = self.model
            await asyncio.to_thread(self._load)
        except Exception as exc:  # keep serving the model we have; /readyz shows the error
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("champion load failed: %s", self.load_error)
            return False
        if previous is not None:
            self.reloads += 1
            log.info("champion moved: v%s -> v%s", previous.version, self.model.version)
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.serve.reload_seconds)
            await self.reload_if_moved()

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        await self.reload_if_moved()
        self.batcher.start()
        poller = asyncio.create_task(self._poll())
        try:
            yield
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            await self.batcher.stop()
            shutil.rmtree(self._download_dir, ignore_errors=True)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = HTTPException(413, f"body larger than the {limit}-byte limit")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)
    app = FastAPI(title="medxfer inference", lifespan=service.lifespan)
    app.state.service = service

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        model = service.model
        body = {"ready": model is not None, "model": model.describe() if model else None,
                "load_error": service.load_error, "reloads": service.reloads,
                "batches": service.batcher.stats.batches, "concurrent_batches": service.batcher.lanes,
                "mean_batch_size": round(service.batcher.stats.mean_batch, 2),
                "network_calls": model.network_calls if model else 0}
        return JSONResponse(body, status_code=200 if model is not None else 503)

    @app.post("/v1/predict", response_model=None)
    async def predict(request: Request) -> dict | Response:  # noqa: the body is JSON or a DICOM SR
        started = time.perf_counter()
        check_key(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            raise HTTPException(415, f"Content-Type must be one of {', '.join(ACCEPTED_TYPES)}, "
                                     f"not {content_type or 'missing'}")
        as_dicom = wants_dicom_result(request.headers.get("accept", ""))
        if as_dicom and content_type != DICOM_TYPE:
            raise HTTPException(406, "a DICOM result (Accept: application/dicom) answers a DICOM request only: "
                                     "it belongs in the study of the image it scores")
        body = await _read_body(request, settings.serve.max_body_bytes)
        if not body:
            raise HTTPException(400, "empty body")
        model = service.model
        if model is None:
            raise HTTPException(503, f"no model loaded: {service.load_error}")
        try:
            # Decoding, resizing, cropping and reading the header facts in the request's own
            # thread: the batch then holds small crops and its thread does nothing but the network.
            async with service.decode_slots:
                prepared = await asyncio.to_thread(model.prepare, REQUEST_NAME, body)
        except UnreadableImage as exc:
            return _unreadable(exc, content_type)
        except Exception as exc:  # load_grey bounds decoding; this is the resize, or a bug: still the body's
            log.debug("unexpected error preparing a request body", exc_info=True)
            return _unreadable(UnreadableImage(RejectKind.UNEXPECTED, exception_detail(exc)), content_type)
        # The crop travels with the model that made it (see Service._predict).
        prediction, model = await service.batcher.submit((model, prepared.crop, prepared.facts))
        # Only sizes, timings and the domain flag: nothing from the image or its header is logged.
        log.info("predict %s v%s %dx%d in_domain=%s %.1f ms", model.name, model.version, *prepared.size[:2],
                 prediction.domain.in_domain, 1000 * (time.perf_counter() - started))
        if settings.domain_policy is DomainPolicy.REFUSE and prediction.domain.in_domain is False:
            return _rejected(RejectKind.OUT_OF_DOMAIN, "the input is outside the model's training domain",
                             content_type, **prediction.domain.as_json(), model=model.describe())
        if as_dicom:  # a Comprehensive SR in the request's study (tasks/dicom_results.py)
            identity = ModelIdentity(model.name, model.version, model.variant)
            try:
                sr = await asyncio.to_thread(lambda: result_sr_for(
                    read_dicom_header(body, detect_format(body), pixels=False), prediction, identity))
            except NotReferenceable as exc:
                raise HTTPException(422, f"cannot answer with a DICOM result: {exc}") from None
            return Response(sr, media_type=DICOM_TYPE)
        return prediction.body | {"model": model.describe()}

    return app
