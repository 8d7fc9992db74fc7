"""The web UI's server: JSON and server-sent-event endpoints over ``out_dir``, and the
static pages (``static/``) that use them."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from lmpipe import api
from lmpipe.cli import one_line
from lmpipe.errors import LmpipeError
from lmpipe.tracking.jsonl import read_metrics_from
from lmpipe.tracking.runs import NotInside, file_inside, find_pipelines, find_runs
from lmpipe.ui import details
from lmpipe.ui.auth import TokenGate
from lmpipe.ui.chat import ChatRequest, ModelCache, checkpoint_path, reply_events
from lmpipe.ui.events import follow_run

STATIC = Path(__file__).parent / "static"
EVENT_STREAM = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(cfg) -> FastAPI:
    """The app for a ``conf/ui.yaml`` config (``out_dir``, ``token``, ``device``,
    ``cached_models``, ``poll_interval_s``, ``stale_after_s``)."""
    root = Path(cfg.out_dir).resolve()
    stale = float(cfg.stale_after_s)
    models = ModelCache(str(cfg.device), int(cfg.cached_models))
    chat_cfg = api.compose("chat")
    chat_defaults = {key: chat_cfg[key] for key in api.SAMPLING}

    app = FastAPI(title="lmpipe", docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.token:
        app.add_middleware(TokenGate, token=str(cfg.token))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(NotInside)
    async def not_found(request: Request, exc: NotInside) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(LmpipeError)
    async def user_error(request: Request, exc: LmpipeError) -> JSONResponse:
        return JSONResponse({"detail": one_line(exc)}, status_code=400)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def run_list() -> dict:
        return details.finite(
            {
                "out_dir": str(root),
                "runs": [r.to_dict() for r in find_runs(root, stale)],
                "pipelines": find_pipelines(root),
            }
        )

    @app.get("/api/run")
    def run_detail(run: str) -> dict:
        return details.run_detail(root, run, stale)

    @app.get("/api/run/metrics")
    def metrics(run: str, offset: int = Query(0, ge=0)) -> dict:
        """The run's metric records after byte ``offset``, and the offset to follow from."""
        path = details.run_dir(root, run) / "metrics.jsonl"
        records, end = read_metrics_from(path, offset) if file_inside(root, path) else ([], 0)
        return details.finite({"records": records, "offset": end})

    @app.get("/api/run/events")
    def events(request: Request, run: str, offset: int = Query(0, ge=0)) -> StreamingResponse:
        last_id = request.headers.get("last-event-id", "")
        start = int(last_id) if last_id.isdigit() else offset  # a reconnect goes on from there
        stream = follow_run(root, details.run_dir(root, run), start, cfg.poll_interval_s, stale)
        return StreamingResponse(stream, media_type="text/event-stream", headers=EVENT_STREAM)

    @app.get("/api/pipeline")
    def pipeline(pipeline: str) -> dict:
        return details.pipeline_report(root, pipeline)

    @app.get("/api/pipeline/image")
    def pipeline_image(pipeline: str, name: str) -> FileResponse:
        return FileResponse(details.pipeline_image(root, pipeline, name), media_type="image/png")

    @app.get("/api/checkpoints")
    def checkpoints() -> dict:
        return {"checkpoints": details.all_checkpoints(root, stale)}

    @app.get("/api/chat/defaults")
    def chat_settings() -> dict:
        return {**chat_defaults, "system": chat_cfg.system}

    @app.post("/api/chat")
    def chat(request: ChatRequest) -> StreamingResponse:
        model = models.get(checkpoint_path(root, request.run, request.checkpoint))
        stream = reply_events(model, request, chat_defaults)
        return StreamingResponse(stream, media_type="text/event-stream", headers=EVENT_STREAM)

    return app
