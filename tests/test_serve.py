"""`cvfast serve` end to end: the server runs as its own process on a loopback port with the tiny
model (as a user starts it), the tests talk HTTP to it; the store's recovery rules are also checked
on the store alone; the page is driven by headless Chromium."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import cvfast
from cvfast.serve.store import Store
from tests.extras import require

require("fastapi")
require("uvicorn")

STARTUP_S = 120  # importing torch and loading the tiny model, on a loaded 2-core machine
STEPS = 2


class Server:
    """`python -m cvfast serve --model tiny` on a free loopback port (with `ranks` > 1 under torchrun,
    CPU processes over gloo), and an HTTP client for it."""

    def __init__(self, store: Path, *args: str, token: str | None = None, ranks: int = 1):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.token, self.log = token, open(store.parent / f"server-{self.port}.log", "w")
        env = dict(os.environ, CVFAST_TOKEN=token) if token else {k: v for k, v in os.environ.items()
                                                                   if k != "CVFAST_TOKEN"}
        launcher = [sys.executable] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        env.update(OMP_NUM_THREADS="1") if ranks > 1 else None
        self.process = subprocess.Popen([*launcher, "-m", "cvfast", "serve", "--model", "tiny", "--port",
                                         str(self.port), "--store", str(store), *args], stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (store.parent / f"server-{self.port}.log").read_text()
            try:
                if self.call("GET", "/v1/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    def call(self, method: str, path: str, body=None, token: str | None = "default"):
        """(status, parsed JSON or bytes)."""
        token = self.token if token == "default" else token
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read(), error.headers.get("content-type", "")
        return status, json.loads(raw) if "json" in kind else raw

    def upload(self, fields: dict[str, str], files: dict[str, Path]):
        """POST /v1/videos as a multipart form (as `curl -F` sends it): (status, parsed JSON)."""
        boundary, parts = "cvfast-test-boundary", []
        for key, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        for key, path in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{path.name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/videos", method="POST",
                                         data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait(self, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/v1/videos/{job_id}")[1]
            if job["status"] in until:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} stayed {job['status']}")

    def stop(self, sig=signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(*args, **kwargs):
        server = Server(tmp_path / "store", *args, **kwargs)
        started.append(server)
        return server
    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop()


def expected_video(pipe, tmp_path, prompt: str, seed: int) -> bytes:
    """What `cvfast.generate` writes for these arguments (the same load, call and writer)."""
    result = pipe.generate(prompt, seed=seed, num_inference_steps=STEPS, progress=False)
    return cvfast.save_video(result.frames[0], tmp_path / f"expected-{seed}.mp4", fps=result.fps).read_bytes()


def test_thirty_jobs_from_ten_clients_equal_generate(servers, tmp_path):
    server = servers()
    submitted, errors = {}, []

    def client(k: int) -> None:
        for j in range(3):
            seed = 100 + 3 * k + j
            status, body = server.call("POST", "/v1/videos", {"prompt": f"a cat, take {seed}", "seed": seed,
                                                              "num_inference_steps": STEPS})
            if status != 202:
                errors.append((status, body))
            else:
                submitted[body["id"]] = seed
    threads = [threading.Thread(target=client, args=(k,)) for k in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(submitted) == 30
    pipe = cvfast.load("tiny")
    for job_id, seed in submitted.items():
        job = server.wait(job_id)
        assert job["status"] == "succeeded" and job["seed"] == seed and job["progress"] == {"step": 2, "steps": 2}
        status, video = server.call("GET", f"/v1/videos/{job_id}/content")
        assert status == 200 and video == expected_video(pipe, tmp_path, f"a cat, take {seed}", seed)
    metrics = server.call("GET", "/metrics")[1].decode()
    assert 'cvfast_jobs{status="succeeded"} 30' in metrics and "cvfast_step_seconds_count 60" in metrics


def test_queue_limit_cancel_errors_and_token(servers):
    server = servers("--max-queue", "5", token="s3cret")
    assert server.call("GET", "/v1/videos", token=None)[0] == 401
    assert server.call("POST", "/v1/videos", {"prompt": "a cat"}, token="wrong")[0] == 401
    assert server.call("GET", "/v1/health", token=None)[0] == 200
    status, body = server.call("POST", "/v1/videos", {"prompt": "a cat", "num_frames": 10})
    assert status == 422 and body["detail"].startswith("num_frames=10 is not accepted")
    status, body = server.call("POST", "/v1/videos", {"prompt": "a cat", "steps": 3})
    assert status == 422 and "unknown field ['steps']" in body["detail"]
    long_job = server.call("POST", "/v1/videos", {"prompt": "a long one", "num_inference_steps": 1000})[1]["id"]
    server.wait(long_job, until=("running",))
    waiting = [server.call("POST", "/v1/videos", {"prompt": f"p{i}"}) for i in range(6)]
    assert [status for status, _ in waiting] == [202] * 5 + [429]
    assert "the queue is full" in waiting[5][1]["detail"]
    assert server.call("GET", f"/v1/videos/{waiting[4][1]['id']}")[1]["queue_position"] == 5
    while server.call("GET", f"/v1/videos/{long_job}")[1]["progress"]["step"] < 3:
        time.sleep(0.01)
    asked = server.call("DELETE", f"/v1/videos/{long_job}")[1]  # its state when the cancel was recorded
    done = server.wait(long_job)
    assert done["status"] == "cancelled" and done["progress"]["step"] <= asked["progress"]["step"] + 1
    for _, body in waiting[:5]:  # the first may be running by now: it stops at its next step
        server.call("DELETE", f"/v1/videos/{body['id']}")
        assert server.wait(body["id"])["status"] == "cancelled"
    assert server.call("GET", f"/v1/videos/{long_job}/content")[0] == 404
    model = server.call("GET", "/v1/model")[1]
    assert model["name"] == "tiny" and model["precision"] == "bf16" and model["defaults"]["num_frames"] == 9


def test_sigkill_loses_no_job_and_serves_none_twice(servers, tmp_path):
    first = servers()
    done = first.call("POST", "/v1/videos", {"prompt": "done before", "num_inference_steps": STEPS})[1]["id"]
    first.wait(done)
    before = first.call("GET", f"/v1/videos/{done}/content")[1]
    running = first.call("POST", "/v1/videos", {"prompt": "interrupted", "num_inference_steps": 200, "seed": 7})[1]["id"]
    queued = [first.call("POST", "/v1/videos", {"prompt": f"queued {i}", "num_inference_steps": STEPS})[1]["id"]
              for i in range(2)]
    first.wait(running, until=("running",))
    first.stop(signal.SIGKILL)
    second = servers()
    for job_id in (running, *queued):
        assert second.wait(job_id)["status"] == "succeeded"
    assert second.call("GET", f"/v1/videos/{running}")[1]["attempts"] == 2  # re-run once
    assert second.call("GET", f"/v1/videos/{done}/content")[1] == before
    listed = [job["id"] for job in second.call("GET", "/v1/videos")[1]["jobs"]]
    assert sorted(listed) == sorted([done, running, *queued])  # none lost, none twice


def test_a_video_uploaded_as_a_multipart_form(servers, tmp_path):
    """`curl -F prompt=... -F video=@in.mp4`: video-to-video from an uploaded file, equal to generate()
    on the same file; a field of the wrong type is a 422 naming it."""
    import numpy as np
    frames = np.linspace(0, 1, 9 * 64 * 96 * 3, dtype=np.float32).reshape(9, 64, 96, 3)
    source = cvfast.save_video(frames, tmp_path / "in.mp4")
    server = servers()
    fields = {"prompt": "a cat", "num_inference_steps": "4", "strength": "0.5", "seed": "3"}
    status, body = server.upload(fields, {"video": source})
    assert status == 202
    job = server.wait(body["id"])
    assert job["status"] == "succeeded" and job["arguments"]["video"].endswith("base64 characters>")
    pipe = cvfast.load("tiny")
    result = pipe.generate("a cat", video=cvfast.video.read_video(source), strength=0.5, num_inference_steps=4, seed=3,
                           progress=False)
    expected = cvfast.save_video(result.frames[0], tmp_path / "expected.mp4", fps=result.fps).read_bytes()
    assert server.call("GET", f"/v1/videos/{body['id']}/content")[1] == expected
    status, body = server.upload({"prompt": "a cat", "num_inference_steps": "many"}, {})
    assert status == 422 and body["detail"] == "num_inference_steps='many' is not accepted: an integer"


def test_under_torchrun_rank_0_serves_and_both_ranks_generate(servers, tmp_path):
    """--parallel cfg=2 on two CPU processes (gloo): the job's video is one process's (CFG halves on
    two ranks agree with one rank to fp32 rounding, so the frames, not the encoded bytes, are
    compared); stopping the server stops every rank."""
    import numpy as np
    server = servers("--parallel", "cfg=2", ranks=2)
    job = server.call("POST", "/v1/videos", {"prompt": "a cat", "num_inference_steps": STEPS, "seed": 3})[1]["id"]
    assert server.wait(job)["status"] == "succeeded"
    (tmp_path / "served.mp4").write_bytes(server.call("GET", f"/v1/videos/{job}/content")[1])
    pipe = cvfast.load("tiny")
    result = pipe.generate("a cat", seed=3, num_inference_steps=STEPS, progress=False)
    expected = cvfast.save_video(result.frames[0], tmp_path / "expected.mp4", fps=result.fps)
    served, single = (cvfast.video.read_video(path).astype(np.float32) for path in (tmp_path / "served.mp4", expected))
    assert served.shape == single.shape and np.abs(served - single).mean() < 0.5  # of 255
    server.stop()  # torchrun passes the signal to every rank
    with pytest.raises(OSError):
        server.call("GET", "/v1/health")


def test_a_job_interrupted_twice_fails_with_the_reason(tmp_path):
    store = Store(tmp_path / "jobs.sqlite3")
    job = store.add({"prompt": "x"}, 1, 2, max_queue=10)
    for _ in range(2):  # the server dies while it runs, twice
        assert store.claim()["id"] == job["id"]
        Store(tmp_path / "jobs.sqlite3").recover()  # a new server on the same store
    final = store.get(job["id"])
    assert final["status"] == "failed" and "stopped while this job ran, 2 times" in final["error"]


def test_the_page_in_headless_chromium(servers, tmp_path):
    webdriver = require("selenium.webdriver")
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:  # a system program, not a Python package: .ci/run installs it
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = servers()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "prompt").send_keys("a red panda")
        steps = driver.find_element(By.ID, "num_inference_steps")
        steps.clear()
        steps.send_keys("3")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "state").text.startswith("succeeded 100 %"))
        assert driver.execute_script("return document.getElementById('progress').value") == 3
        # The video (webm) loads and plays: data for the current frame, and time moving on.
        wait.until(lambda d: d.execute_script("const v = document.getElementById('video');"
                                              "return v.readyState >= 2 && v.currentTime > 0 && !v.error"))
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 0
        rows = driver.find_elements(By.CSS_SELECTOR, "#jobs tr")
        assert rows and "a red panda" in rows[0].text
    finally:
        driver.quit()


def test_a_clean_stop_puts_the_running_job_back_in_the_queue(servers):
    first = servers()
    job = first.call("POST", "/v1/videos", {"prompt": "long", "num_inference_steps": 200})[1]["id"]
    first.wait(job, until=("running",))
    first.stop(signal.SIGINT)  # Ctrl-C
    second = servers()
    finished = second.wait(job)
    assert finished["status"] == "succeeded" and finished["attempts"] == 1  # the stopped run was not counted


@pytest.mark.parametrize("body,message", [
    ({"prompt": "a cat", "video": "bm90IGEgdmlkZW8="}, r"video='<16 base64 characters>' is not accepted: a video file "
                                                      r"ffmpeg can read \(.*Invalid data"),
    ({"prompt": "a cat", "image": "***"}, r"image='<3 base64 characters>' is not accepted: a base64 PNG or JPEG"),
    ({"prompt": 3}, r"prompt=3 is not accepted: a string"),
    ({"prompt": "a cat", "format": "avi"}, r"format='avi' is not accepted: one of \['mp4', 'webm', 'gif'\]"),
    ([1, 2], "a JSON object of generation arguments"),
])
def test_bodies_that_cannot_be_generated_name_their_field(body, message):
    from cvfast.core.errors import CVFastInputError
    from cvfast.serve.worker import generation_arguments
    with pytest.raises(CVFastInputError, match=message):
        generation_arguments(body)
