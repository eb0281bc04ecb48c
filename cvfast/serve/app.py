"""The HTTP API (FastAPI, versioned under /v1) and the page at `/`, over one warm pipeline, its
`Store` and its `Worker`. See the README's "Serving" section for the endpoints with curl examples."""

import asyncio
import json
import secrets
from pathlib import Path

from ..core.errors import CVFastInputError
from .page import PAGE
from .store import FINAL, QueueFull, Store
from .worker import form_body, submit

# A request body larger than this is refused (413) before it is read whole: a base64 image or short
# video fits many times over; a runaway upload does not fill the server's memory.
MAX_BODY_BYTES = 64 * 2 ** 20
EVENT_POLL_S = 0.1  # how often the events stream looks at its job
MEDIA_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}


def create_app(pipe, store: Store, videos: Path, *, max_queue: int, token: str | None, model: dict):
    """The FastAPI app. token: when set, every /v1 endpoint but /v1/health and /metrics need
    `Authorization: Bearer <token>` (or `?token=`, for what a browser fetches by URL)."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="cvfast", version=model.get("cvfast", ""))

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
            or request.query_params.get("token", "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "a valid token is needed: Authorization: Bearer <token>")

    def job_or_404(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.exception_handler(CVFastInputError)
    async def input_error(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=429)

    @app.post("/v1/videos", status_code=202, dependencies=[Depends(authorised)])
    async def create(request: Request):
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is larger than {MAX_BODY_BYTES // 2 ** 20} MiB")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=MAX_BODY_BYTES)
            files = {key: await value.read() for key, value in form.items() if hasattr(value, "read")}
            body = form_body({key: value for key, value in form.items() if key not in files}, files)
        else:
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPException(413, f"the body is larger than {MAX_BODY_BYTES // 2 ** 20} MiB")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CVFastInputError(f"the body is not accepted: JSON or a multipart form expected ({exc})") from None
        job = await asyncio.to_thread(submit, pipe, store, body, max_queue)  # decoding media, checking sizes
        return {"id": job["id"], "status": job["status"]}

    @app.get("/v1/videos", dependencies=[Depends(authorised)])
    def recent(limit: int = 20):
        return {"jobs": store.recent(max(1, min(limit, 200)))}

    @app.get("/v1/videos/{job_id}", dependencies=[Depends(authorised)])
    def status(job_id: str):
        return job_or_404(job_id)

    @app.delete("/v1/videos/{job_id}", dependencies=[Depends(authorised)])
    def cancel(job_id: str):
        job_or_404(job_id)
        return store.cancel(job_id)

    @app.get("/v1/videos/{job_id}/content", dependencies=[Depends(authorised)])
    def content(job_id: str):
        job = job_or_404(job_id)
        if job["status"] != "succeeded":
            raise HTTPException(404, f"job {job_id} has no video: it is {job['status']}")
        path = videos / job["video"]
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix[1:]], filename=path.name)

    @app.get("/v1/videos/{job_id}/events", dependencies=[Depends(authorised)])
    async def events(job_id: str):
        job_or_404(job_id)

        async def stream():
            last = None
            while True:
                job = await asyncio.to_thread(store.get, job_id)
                state = (job["status"], job["progress"]["step"])
                if state != last:
                    last = state
                    yield f"data: {json.dumps(job)}\n\n"
                if job["status"] in FINAL:
                    return
                await asyncio.sleep(EVENT_POLL_S)
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/model", dependencies=[Depends(authorised)])
    def model_info():
        return model

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(prometheus(store), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def prometheus(store: Store) -> str:
    """The metrics in Prometheus' text format, computed from the store (nothing counted in memory)."""
    counts, done = store.counts(), store.durations()
    lines = ["# HELP cvfast_queue_depth Jobs waiting.", "# TYPE cvfast_queue_depth gauge",
             f"cvfast_queue_depth {counts['queued']}",
             "# HELP cvfast_jobs Jobs by status.", "# TYPE cvfast_jobs gauge"]
    lines += [f'cvfast_jobs{{status="{status}"}} {n}' for status, n in counts.items()]
    lines += ["# HELP cvfast_job_seconds Seconds from start to video, succeeded jobs.",
              "# TYPE cvfast_job_seconds summary",
              f"cvfast_job_seconds_sum {sum(job for job, _, _ in done):.6f}", f"cvfast_job_seconds_count {len(done)}",
              "# HELP cvfast_step_seconds Seconds per denoising step, succeeded jobs.",
              "# TYPE cvfast_step_seconds summary",
              f"cvfast_step_seconds_sum {sum(denoise for _, denoise, _ in done):.6f}",
              f"cvfast_step_seconds_count {sum(steps for _, _, steps in done)}"]
    return "\n".join(lines) + "\n"
