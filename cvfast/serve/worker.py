"""What a job is and who runs it: `generation_arguments` turns a submitted JSON body into
`Pipeline.generate` arguments, checked by the pipeline's own `request()` (the Python API's rules and
messages) before the job is queued; `Worker` runs the queued jobs one at a time on the one warm
pipeline (one GPU, one worker), writing progress to the store after each step and the video beside
it, atomically. Compatible jobs are not batched: that has not been measured to help."""
from __future__ import annotations

import base64
import binascii
import io
import logging
import random
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from ..core.checks import positive_int
from ..core.errors import CVFastError, CVFastInputError, bad_arg
from ..video import read_video, save_video
from .store import Store

log = logging.getLogger("cvfast")

# The body's fields: generate()'s arguments the API takes, and the output's fps and format.
GENERATE_FIELDS = ("prompt", "negative_prompt", "num_frames", "height", "width", "num_inference_steps",
                   "guidance_scale", "use_dynamic_cfg", "cache", "image", "video", "strength")
FIELDS = (*GENERATE_FIELDS, "seed", "fps", "format")
FORMATS = ("mp4", "webm", "gif")
# A multipart form's fields arrive as text: their JSON types, for the fields that are not strings.
FORM_TYPES = {**{key: (int, "an integer") for key in ("num_frames", "height", "width", "num_inference_steps", "seed",
                                                      "fps")},
              **{key: (float, "a number") for key in ("guidance_scale", "strength")},
              "use_dynamic_cfg": (lambda text: {"true": True, "false": False}[text.lower()], "true or false")}
POLL_S = 0.05  # how often an idle worker looks for a queued job


class Cancelled(Exception):
    """Raised from the step callback when the job's cancel was asked."""


class Interrupted(Exception):
    """Raised from the step callback when the server stops: the job goes back to the queue."""


def decoded_image(text: str):
    from PIL import Image
    try:
        return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")
    except (binascii.Error, OSError, ValueError) as exc:
        raise bad_arg("image", f"<{len(text)} base64 characters>", f"a base64 PNG or JPEG file ({exc})") from None


def decoded_video(text: str):
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_arg("video", f"<{len(text)} base64 characters>", f"a base64 video file ({exc})") from None
    with tempfile.TemporaryDirectory() as folder:  # ffmpeg reads files
        path = Path(folder) / "input"
        path.write_bytes(data)
        try:
            return read_video(path, "video")
        except CVFastInputError as exc:  # its message names the scratch file; the client sent bytes
            said = str(exc).rpartition("cannot be read as a video: ")[2]
            raise bad_arg("video", f"<{len(text)} base64 characters>", f"a video file ffmpeg can read ({said})") from None


def form_body(fields: dict[str, str], files: dict[str, bytes]) -> dict:
    """A multipart form as the JSON body it stands for: text fields typed (`FORM_TYPES`), uploaded
    `image` / `video` files base64-encoded (so both kinds of request are stored alike)."""
    body = {}
    for key, text in fields.items():
        parse, accepted = FORM_TYPES.get(key, (str, "text"))
        try:
            body[key] = parse(text)
        except (ValueError, KeyError):
            raise bad_arg(key, text, accepted) from None
    body.update({key: base64.b64encode(data).decode() for key, data in files.items()})
    return body


def generation_arguments(body) -> dict:
    """A submitted body's generate() arguments (images and videos decoded), or CVFastInputError
    naming the field. `seed`, `fps` and `format` are checked here and left out."""
    if not isinstance(body, dict):
        raise CVFastInputError("the body is not accepted: a JSON object of generation arguments")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise CVFastInputError(f"unknown field{'s' if len(unknown) > 1 else ''} {unknown}: the fields are {list(FIELDS)}")
    if not isinstance(body.get("prompt"), str):
        raise bad_arg("prompt", body.get("prompt"), "a string")
    if body.get("format", "mp4") not in FORMATS:
        raise bad_arg("format", body.get("format"), f"one of {list(FORMATS)}")
    if body.get("fps") is not None:
        positive_int("fps", body["fps"])
    arguments = {key: body[key] for key in GENERATE_FIELDS if key in body}
    if "image" in arguments:
        arguments["image"] = decoded_image(arguments["image"])
    if "video" in arguments:
        arguments["video"] = decoded_video(arguments["video"])
    return arguments


def submit(pipe, store: Store, body, max_queue: int) -> dict:
    """Check the body as generate() would, choose the seed, queue the job (QueueFull when full)."""
    arguments = generation_arguments(body)
    seed = body.get("seed")
    if seed is None:
        seed = random.randrange(2 ** 63)
    request = pipe.request(seed=seed, **arguments)  # the Python API's checks and messages
    return store.add(dict(body, seed=seed), seed, request.steps - request.start, max_queue)


class Worker(threading.Thread):
    """Runs queued jobs one at a time on `pipe`, until `stop` is set. In a parallel job (the pipeline
    loaded with parallel=, under torchrun) it runs on rank 0 and hands each job to the other ranks
    (`follow`) before generating it with them."""

    def __init__(self, pipe, store: Store, videos: Path):
        super().__init__(name="cvfast-worker", daemon=True)
        self.pipe, self.store, self.videos = pipe, store, videos
        self.stop = threading.Event()
        self.ranks = Ranks() if pipe.parallel is not None else None

    def run(self) -> None:
        while not self.stop.is_set():
            job = self.store.claim()
            if job is None:
                if self.ranks is not None:
                    self.ranks.keep_alive()
                self.stop.wait(POLL_S)
                continue
            self.execute(job)
        if self.ranks is not None:
            self.ranks.send(("stop",))

    def execute(self, job: dict) -> None:
        job_id = job["id"]
        body = self.store.arguments(job_id)

        def on_step(step, timestep, latents):
            # One rank cannot leave the loop alone (the others would wait in its collectives): in a
            # parallel job a cancelled running job stops at its end and keeps no video, and a
            # stopping server waits for the job.
            cancel_asked = self.store.progress(job_id, step + 1)
            if self.ranks is None and self.stop.is_set():
                raise Interrupted
            if self.ranks is None and cancel_asked:
                raise Cancelled
        try:
            arguments = dict(generation_arguments({k: v for k, v in body.items() if k != "seed"}), seed=job["seed"],
                             progress=False)
            if self.ranks is not None:
                self.ranks.send(("job", arguments))
            result = self.pipe.generate(callback=on_step, **arguments)
            if self.store.get(job_id)["cancel_asked"]:
                raise Cancelled
            path = self.videos / f"{job_id}.{body.get('format', 'mp4')}"
            save_video(result.frames[0], path, fps=body.get("fps") or result.fps)
            self.store.succeed(job_id, path.name, result.timings)
        except Cancelled:
            self.store.fail(job_id, "cancelled while running", status="cancelled")
        except Interrupted:
            self.store.requeue(job_id)
        except CVFastError as exc:
            self.store.fail(job_id, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # the worker must outlive one broken job; the error is the job's record
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            self.store.fail(job_id, f"{type(exc).__name__}: {exc}")


# The other ranks wait for rank 0's next message in a collective; one at least this often while the
# queue is empty keeps them within any process-group timeout (NCCL's default is 10 minutes).
KEEP_ALIVE_S = 30.0


class Ranks:
    """Rank 0's side of a parallel job: messages to the other ranks, ("job", generate arguments),
    ("idle",) or ("stop",), sent by broadcast from the worker thread (the one thread that issues
    collectives)."""

    def __init__(self):
        self.last = time.monotonic()

    def send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0)
        self.last = time.monotonic()

    def keep_alive(self) -> None:
        if time.monotonic() - self.last > KEEP_ALIVE_S:
            self.send(("idle",))


def follow(pipe) -> None:
    """The other ranks of a parallel server: generate each job rank 0 sends, with it, until it says stop."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        kind, *rest = message[0]
        if kind == "stop":
            return
        if kind == "job":
            pipe.generate(**rest[0])
