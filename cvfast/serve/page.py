"""The page `cvfast serve` shows at `/`: a prompt form with the main options, live progress from the
job's event stream, the video when it is done, and the recent jobs with their seeds. Plain HTML and a
little JavaScript, no build step. With --token, the page asks for it once (kept in localStorage)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>cvfast</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
 label { display: inline-block; margin: .25rem 1rem .25rem 0; }
 textarea { width: 100%; height: 4rem; }
 input[type=number] { width: 6rem; }
 progress { width: 100%; height: 1.2rem; }
 #error { color: #b00020; white-space: pre-wrap; }
 table { border-collapse: collapse; width: 100%; font-size: .9rem; }
 td, th { border-bottom: 1px solid #ddd; padding: .25rem; text-align: left; }
</style>
</head>
<body>
<h1>cvfast</h1>
<p id="model"></p>
<form id="form">
 <textarea id="prompt" placeholder="a red panda eating bamboo in a misty forest" required></textarea>
 <label>negative prompt <input id="negative_prompt"></label>
 <label>frames <input id="num_frames" type="number" min="1"></label>
 <label>height <input id="height" type="number" min="8"></label>
 <label>width <input id="width" type="number" min="8"></label>
 <label>steps <input id="num_inference_steps" type="number" min="1" value="50"></label>
 <label>guidance <input id="guidance_scale" type="number" step="0.1" value="6"></label>
 <label>seed <input id="seed" type="number" min="0"></label>
 <label>format <select id="format"><option>webm</option><option>mp4</option><option>gif</option></select></label>
 <button id="submit" type="submit">Generate</button>
</form>
<p><progress id="progress" max="1" value="0"></progress> <span id="state"></span></p>
<p id="error"></p>
<video id="video" controls loop autoplay muted playsinline width="720" hidden></video>
<img id="gif" hidden>
<h2>Recent jobs</h2>
<table><thead><tr><th>status</th><th>prompt</th><th>seed</th><th>progress</th><th></th></tr></thead>
<tbody id="jobs"></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
let token = localStorage.getItem("cvfast-token") || "";
const auth = () => token ? {"Authorization": "Bearer " + token} : {};
const withToken = (url) => token ? url + "?token=" + encodeURIComponent(token) : url;

async function api(path, options = {}) {
  const response = await fetch(path, {...options, headers: {...auth(), ...(options.headers || {})}});
  if (response.status === 401) {
    token = prompt("This server needs its token") || "";
    localStorage.setItem("cvfast-token", token);
    return api(path, options);
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function show(job) {
  const {step, steps} = job.progress;
  $("progress").max = steps; $("progress").value = step;
  $("state").textContent = job.status + " " + Math.round(100 * step / steps) + " %"
    + (job.queue_position ? " (position " + job.queue_position + " in the queue)" : "");
  if (job.status === "succeeded") {
    const url = withToken("/v1/videos/" + job.id + "/content");
    if (job.video.endsWith(".gif")) { $("gif").src = url; $("gif").hidden = false; $("video").hidden = true; }
    else { $("video").src = url; $("video").hidden = false; $("gif").hidden = true; }
  }
  if (job.status === "failed" || job.status === "cancelled") $("error").textContent = job.error || job.status;
}

async function recent() {
  const {jobs} = await api("/v1/videos?limit=10");
  $("jobs").innerHTML = "";
  for (const job of jobs) {
    const row = document.createElement("tr");
    for (const text of [job.status, job.arguments.prompt, job.seed, job.progress.step + "/" + job.progress.steps]) {
      const cell = document.createElement("td"); cell.textContent = text; row.appendChild(cell);
    }
    const cell = document.createElement("td");
    if (job.status === "succeeded") {
      const link = document.createElement("a");
      link.href = withToken("/v1/videos/" + job.id + "/content"); link.textContent = "video";
      cell.appendChild(link);
    }
    row.appendChild(cell); $("jobs").appendChild(row);
  }
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const body = {prompt: $("prompt").value, format: $("format").value};
  for (const key of ["negative_prompt"]) if ($(key).value) body[key] = $(key).value;
  for (const key of ["num_frames", "height", "width", "num_inference_steps", "seed"])
    if ($(key).value) body[key] = parseInt($(key).value, 10);
  if ($("guidance_scale").value) body.guidance_scale = parseFloat($("guidance_scale").value);
  try {
    const {id} = await api("/v1/videos", {method: "POST", body: JSON.stringify(body),
                                          headers: {"Content-Type": "application/json"}});
    const events = new EventSource(withToken("/v1/videos/" + id + "/events"));
    events.onmessage = (message) => {
      const job = JSON.parse(message.data);
      show(job);
      if (["succeeded", "failed", "cancelled"].includes(job.status)) { events.close(); recent(); }
    };
  } catch (error) { $("error").textContent = error.message; }
});

api("/v1/model").then((model) => {
  $("model").textContent = model.name + " (" + model.variant + "), " + model.dtype + " on " + model.device
    + (model.precision === "bf16" ? "" : ", " + model.precision) + "; default " + model.defaults.num_frames
    + " frames at " + model.defaults.height + "x" + model.defaults.width;
  recent();
}).catch((error) => { $("error").textContent = error.message; });
</script>
</body>
</html>
"""
