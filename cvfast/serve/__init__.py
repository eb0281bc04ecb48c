"""`cvfast serve`: one warm pipeline behind an HTTP job API and a web page. Jobs and their states are
kept in SQLite in the store directory (`store.py`) with the videos beside it; one worker runs them
one at a time (`worker.py`); the API and the page are a FastAPI app (`app.py`, `page.py`) served by
uvicorn. FastAPI and uvicorn are the `serve` extra (`pip install cvfast[serve]`)."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..core.errors import CVFastInputError
from ..core.files import check_writable
from .app import create_app
from .store import Store
from .worker import Worker, follow

__all__ = ["serve", "open_server", "follow", "require_extra", "Store", "Worker", "create_app"]


def model_info(pipe) -> dict:
    """What `GET /v1/model` says: the loaded model, its backends, precision and defaults."""
    return {"name": pipe.name, "variant": pipe.config.variant, "backends": pipe.backends(),
            "precision": pipe.runtime.precision, "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
            "defaults": pipe.defaults, "cvfast": metadata.version("cvfast")}


def open_server(pipe, store_dir, *, max_queue: int = 64, token: str | None = None):
    """(app, worker) over `pipe` with the store in `store_dir` (created when missing): jobs that were
    running when a previous server died are queued again or failed (`Store.recover`), then the
    worker starts."""
    folder = check_writable(store_dir, "--store", directory=True)
    videos = folder / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    store = Store(folder / "jobs.sqlite3")
    store.recover()
    worker = Worker(pipe, store, videos)
    worker.start()
    app = create_app(pipe, store, videos, max_queue=max_queue, token=token, model=model_info(pipe))
    return app, worker


def require_extra() -> None:
    """CVFastInputError, before anything heavy, where FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CVFastInputError(f"serve needs FastAPI and uvicorn: pip install 'cvfast[serve]' ({exc})") from None


def serve(pipe, store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
          token: str | None = None) -> None:
    """Serve `pipe` until interrupted."""
    import uvicorn
    app, worker = open_server(pipe, store_dir, max_queue=max_queue, token=token)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        worker.stop.set()
        worker.join()  # its job ends, and in a parallel job its "stop" reaches the other ranks
