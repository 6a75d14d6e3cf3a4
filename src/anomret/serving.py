"""The scoring service behind ``python -m anomret.serve``: FastAPI on uvicorn, one model, dynamic batching.

- ``POST /predict``: a ``multipart/form-data`` upload with the field ``image``; the answer is JSON with the
  ``score``, the ``label``, the ``threshold``, the defect ``mask`` (a PNG, base64) and, with ``?map=true``,
  the anomaly map (float32, base64). Nothing is written to disk: the body is read into memory (up to the
  request limit) and parsed there.
- ``GET /health``: the process is up (liveness). ``GET /ready``: the model is loaded and answers (503
  while it loads). ``GET /stats``: requests, batches and batch sizes so far.
- Bad uploads get a 4xx and one sentence: not multipart (415), over the size or pixel limit (413), no
  ``image`` field (422), not an image, truncated, too small (400). An unexpected failure is a 500 that
  names the error; the service keeps serving.

Requests are decoded and preprocessed in a thread pool, then queued; one inference thread takes every
request waiting (up to ``max_batch_size``, waiting at most ``batch_timeout_s`` for more) into one forward
pass of :meth:`anomret.package.Detector.predict_tensors`, so concurrent requests share the encoder's
batch on a GPU. The model is built once, in the background, after the port is open.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_request_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 16


class Rejected(Exception):
    """A request the service answers with a client error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Busy(Exception):
    """The queue is full: the client should retry later."""


# ------------------------------------------------------------------------------------------- uploads
def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """An uploaded file as uint8 RGB, checked before and while it is decoded."""
    from anomret.package import as_rgb

    if not data:
        raise Rejected(400, "the uploaded image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise Rejected(400, f"the upload is not an image PIL can read ({type(error).__name__})") from None
    except Image.DecompressionBombError:
        raise Rejected(413, f"the image has more pixels than the limit of {limits.max_pixels}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise Rejected(
            413,
            f"the image is {width}x{height} ({width * height} pixels), over the limit of {limits.max_pixels}",
        )
    if min(width, height) < limits.min_side:
        raise Rejected(
            400, f"the image is {width}x{height}: both sides must be at least {limits.min_side} pixels"
        )
    try:
        image.load()
        return as_rgb(image)
    except Image.DecompressionBombError:
        raise Rejected(413, f"the image has more pixels than the limit of {limits.max_pixels}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise Rejected(
            400, f"the image cannot be decoded whole: it is truncated or corrupt ({error})"
        ) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is larger than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, f"the request is {int(declared)} bytes, over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_image(request: Request, limits: Limits) -> bytes:
    """The bytes of the ``image`` field of a multipart request, parsed in memory."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Rejected(
            415,
            f"send the image as multipart/form-data with the field 'image' (got content type "
            f"{content_type or 'none'!r}), e.g. curl -F image=@part.png",
        )
    body = await read_body(request, limits.max_request_bytes)

    async def whole() -> Any:
        yield body

    parser = MultiPartParser(request.headers, whole(), max_files=1, max_fields=8)
    parser.spool_max_size = limits.max_request_bytes + 1  # keep the upload in memory, never on disk
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise Rejected(400, f"the multipart body cannot be parsed: {error.message}") from None
    upload = form.get("image")
    if upload is None:
        raise Rejected(422, f"the multipart field 'image' is missing (fields sent: {sorted(form.keys())})")
    if isinstance(upload, str):
        raise Rejected(422, "the field 'image' must be a file upload, not a text value")
    data = await upload.read()
    await form.close()
    return data


# ------------------------------------------------------------------------------------------ batching
class Batcher:
    """One inference thread that runs every waiting request in one forward pass.

    ``batch_timeout_s = 0`` takes what is queued when a pass starts (no added latency: batches grow with
    the load); a positive value waits that long after the first request for more.
    """

    def __init__(
        self,
        predict: Callable[[list[Any]], list[Any]],
        max_batch_size: int = 8,
        batch_timeout_s: float = 0.0,
        max_queue: int = 256,
    ) -> None:
        self.predict = predict
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_timeout_s = max(0.0, float(batch_timeout_s))
        self.max_queue = max(1, int(max_queue))
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="anomret-inference", daemon=True)
        self.batch_sizes: Counter[int] = Counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    async def submit(self, item: Any) -> Any:
        if self._queue.qsize() >= self.max_queue:
            raise Busy()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        items, stopping = [first], False
        deadline = time.monotonic() + self.batch_timeout_s
        while len(items) < self.max_batch_size:
            try:
                remaining = deadline - time.monotonic()
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                stopping = True
                break
            items.append(entry)
        return items, stopping

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items, stopping = self._collect(first)
            try:
                results: list[Any] | None = self.predict([item for item, _, _ in items])
                error: BaseException | None = None
            except Exception as failure:  # answered to every request of the batch, the thread goes on
                log.exception("inference failed for a batch of %d", len(items))
                results, error = None, failure
            self.batch_sizes[len(items)] += 1
            for position, (_, future, loop) in enumerate(items):
                outcome = error if results is None else results[position]
                loop.call_soon_threadsafe(_settle, future, outcome, results is None)
            if stopping:
                return

    def stats(self) -> dict[str, Any]:
        images = sum(size * count for size, count in self.batch_sizes.items())
        return {
            "batches": sum(self.batch_sizes.values()),
            "images": images,
            "largest_batch": max(self.batch_sizes, default=0),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "queued": self._queue.qsize(),
        }


def _settle(future: asyncio.Future, outcome: Any, failed: bool) -> None:
    if future.cancelled():  # the client went away
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


# ------------------------------------------------------------------------------------------ answers
def _png_base64(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def answer(prediction: Any, with_map: bool) -> dict[str, Any]:
    """The JSON of one decision."""
    mask = prediction.mask
    body: dict[str, Any] = {
        "score": prediction.score,
        "label": prediction.label,
        "threshold": prediction.threshold,
        "pixel_threshold": prediction.pixel_threshold,
        "defect_fraction": None if mask is None else float(mask.mean()),
        "mask": None
        if mask is None
        else {"format": "png", "height": mask.shape[0], "width": mask.shape[1], "data": _png_base64(mask)},
    }
    if prediction.normalized_score is not None:
        body["normalized_score"] = prediction.normalized_score
    if with_map:
        values = np.ascontiguousarray(prediction.anomaly_map, dtype="<f4")
        body["anomaly_map"] = {
            "format": "float32-le",
            "height": values.shape[0],
            "width": values.shape[1],
            "data": base64.b64encode(values.tobytes()).decode("ascii"),
        }
    return body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ---------------------------------------------------------------------------------------------- app
class Service:
    """The app's state: the detector (built in the background), the batcher and the counters."""

    def __init__(
        self,
        package: str,
        device: str | None,
        limits: Limits,
        max_batch_size: int,
        batch_timeout_s: float,
        max_queue: int,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.package, self.device, self.limits = package, device, limits
        self.detector: Any = None
        self.failure: str | None = None
        self.on_failure = on_failure
        self.batcher = Batcher(self._predict, max_batch_size, batch_timeout_s, max_queue)
        self.requests: Counter[int] = Counter()

    def _predict(self, inputs: list[Any]) -> list[Any]:
        return self.detector.predict_tensors(inputs)

    def load(self) -> None:
        from anomret import load

        try:
            self.detector = load(self.package, device=self.device)
        except BaseException as error:
            self.failure = f"{type(error).__name__}: {error}"
            if self.on_failure is not None:
                self.on_failure(error)
            return
        self.batcher.start()
        log.info(
            "ready: %s on %s, thresholds %s",
            self.package,
            self.detector.device,
            self.detector.thresholds.describe(),
        )

    def preprocess(self, data: bytes) -> Any:
        return self.detector.preprocess(decode_image(data, self.limits))


def create_app(service: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loader = threading.Thread(target=service.load, name="anomret-load", daemon=True)
        loader.start()
        yield
        if service.detector is not None:
            await run_in_threadpool(service.batcher.stop)

    app = FastAPI(title="anomret scoring service", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.failure is not None:
            return JSONResponse({"status": "failed", "error": service.failure}, status_code=503)
        if service.detector is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        detector = service.detector
        return JSONResponse(
            {
                "status": "ready",
                "method": detector.model.method,
                "device": detector.device,
                "threshold": detector.thresholds.image,
                "pixel_threshold": detector.thresholds.pixel,
            }
        )

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            "responses": {str(k): v for k, v in sorted(service.requests.items())},
            **service.batcher.stats(),
        }

    @app.post("/predict")
    async def predict(request: Request, map: bool = False) -> JSONResponse:
        response = await _predict(request, map)
        service.requests[response.status_code] += 1
        return response

    async def _predict(request: Request, with_map: bool) -> JSONResponse:
        if service.detector is None:
            return _error(503, "the model is still loading; retry when GET /ready answers 200")
        try:
            data = await uploaded_image(request, service.limits)
            tensor = await run_in_threadpool(service.preprocess, data)
            prediction = await service.batcher.submit(tensor)
        except Rejected as rejected:
            return _error(rejected.status, rejected.message)
        except Busy:
            return _error(503, "the service is at its queue limit; retry shortly")
        except Exception as failure:
            log.exception("a request failed")
            return _error(500, f"the image could not be scored ({type(failure).__name__}: {failure})")
        return JSONResponse(answer(prediction, with_map))

    return app
