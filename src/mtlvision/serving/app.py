"""The HTTP application of ``mtlvision serve`` (FastAPI): ``POST /predict``, ``GET /model``, ``GET /health``
and the page at ``/``.

Every refused request gets a 4xx with ``{"error": {"code": ..., "message": ...}}`` naming the problem, and
the service keeps serving: a bad upload never reaches the model, and a failed batch fails only its requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mtlvision.engine.runs import Run
from mtlvision.errors import ConfigError, MtlvisionError

try:
    import python_multipart  # noqa: F401  (starlette parses uploads with it)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException
except ImportError as exc:
    raise ConfigError(f"mtlvision serve needs the serve extra: pip install 'mtlvision[serve]' ({exc})") from None

from mtlvision.serving.encode import Formats
from mtlvision.serving.service import Service
from mtlvision.serving.settings import ServeSettings
from mtlvision.serving.uploads import ServeError, check_content_type, parse_form, read_body

STATIC = Path(__file__).parent / "static"
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"
"""The page's Content-Security-Policy: it loads nothing from outside the service."""


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that gives ``body`` once (the request was read already, within its limit)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def create_app(run: str | Path | Run | Service, settings: ServeSettings | None = None) -> FastAPI:
    """The application serving ``run`` (loaded now, so that a bad run or option fails before serving).

    Args:
        run: a run folder, or a :class:`~mtlvision.serving.service.Service` already built.
        settings: backend, device, batching and limits (ignored when ``run`` is a Service).

    Returns:
        A FastAPI application; its lifespan starts and stops the batcher (uvicorn and ``TestClient`` as a
        context manager run it).
    """
    service = run if isinstance(run, Service) else Service(run, settings)
    limits = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title=f"mtlvision: {service.run.path.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(MtlvisionError)
    async def bad_parameter(request: Request, exc: MtlvisionError) -> JSONResponse:
        return _error(400, "bad_parameter", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, "bad_parameter", problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return service.describe()

    @app.post("/predict")
    async def predict(request: Request, masks: str = "png", maps: str = "png", view: bool = False) -> dict[str, Any]:
        """Every task's result for each image of the multipart field ``image`` (see the module docs)."""
        formats = Formats(masks, maps, view)
        check_content_type(request.headers.get("content-type", ""))
        body = await read_body(dict(request.headers), request.stream, limits)
        uploads = await parse_form(Request(request.scope, _replay(body)).form, limits)
        return await service.predict(uploads, formats)

    return app
