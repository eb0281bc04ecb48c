"""Draw committed benchmark results to PNG: `python benchmarks/plot.py [RESULT.json ...] [--out DIR]`.

For each run file (default: every JSON under benchmarks/results/ written by run.py):
  <name>-ops.png  achieved TFLOP/s (compute-bound ops) or GB/s (memory-bound ops) per op and
                  backend, against the run's measured matmul / copy ceilings;
  <name>-e2e.png  time per e2e stage, one bar per backend (reference, auto, diffusers);
  <name>-step.png the gpu suite's denoising step per configuration, cvfast and diffusers side by side.
`run.py` also draws the run it has just made, beside its JSON, when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvfast.core.files import replacing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _bars(ax, labels, series: dict, ylabel: str, title: str):
    import numpy as np
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks(x + width * (len(series) - 1) / 2, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_ops(record: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    rows = [r for r in record["rows"] if r["suite"] == "ops" and r["median_ms"]]
    if not rows:
        return None
    ceil = record["ceilings"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, limit, unit in ((axes[0], "tflops", ceil.get("matmul_tflops"), "TFLOP/s"),
                                 (axes[1], "gbps", ceil.get("copy_gbps"), "GB/s")):
        # Compute-bound cases (matrix products) on the left, memory-bound ones on the right.
        chosen = [r for r in rows if (r["tflops"] is not None) == (key == "tflops")]
        cases = list(dict.fromkeys(r["case"] for r in chosen))
        backends = list(dict.fromkeys(r["backend"] for r in chosen))
        series = {b: [next((r[key] for r in chosen if r["case"] == c and r["backend"] == b), None) for c in cases]
                  for b in backends}
        _bars(ax, cases, series, unit, f"achieved {unit} ({record['env'].get('device_name')})")
        if limit:
            ax.axhline(limit, color="k", linestyle="--", linewidth=1)
            ax.text(0, limit, f" measured ceiling {limit:.3g}", va="bottom", fontsize=7)
    return _saved(fig, out)


def plot_e2e(record: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    rows = [r for r in record["rows"] if r["suite"] == "e2e" and r["median_ms"]]
    if not rows:
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    series = {b: [next((r["median_ms"] / 1e3 for r in rows if r["case"] == c and r["backend"] == b), None)
                  for c in cases] for b in backends}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _bars(ax, cases, series, "seconds (median)", f"e2e stages ({record['env'].get('device_name')}); "
                                                 "a missing bar: not measured or failed, see the JSON")
    ax.set_yscale("log")
    return _saved(fig, out)


def plot_step(record: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    steps = {key: value for key, value in record.get("summary", {}).items()
             if key.startswith("step_") and isinstance(value, dict) and "cvfast_s" in value}
    if not steps:
        return None
    step = next(iter(steps.values()))
    seconds = {"diffusers": step["diffusers_eager_s"], "diffusers+compile": step["diffusers_compiled_s"],
               **step["cvfast_s"]}
    seconds = {name: value for name, value in seconds.items() if value is not None}
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(list(seconds), list(seconds.values()), color=["tab:gray" if n.startswith("diffusers") else "tab:blue"
                                                           for n in seconds])
    ax.set_ylabel("seconds per denoising step (median)")
    ax.set_title(f"{step['shape']}, {step['dtype']}, {step['device']}", fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return _saved(fig, out)


def _saved(fig, out: Path) -> Path:
    """`fig` as a PNG at `out`, written whole (a temporary file renamed into place)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with replacing(out) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)
    return out


def plot_record(record: dict, out_dir: Path, stem: str) -> list[Path]:
    """Every plot one run's record has data for, as `<stem>-<kind>.png` under `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    written = []
    for kind, fn in (("ops", plot_ops), ("e2e", plot_e2e), ("step", plot_step)):
        png = fn(record, out_dir / f"{stem}-{kind}.png")
        if png:
            written.append(png)
    return written


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "plots")
    args = parser.parse_args(argv)
    files = args.files or sorted(p for p in RESULTS.glob("*.json") if not p.name.startswith("latest-"))
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        record = json.loads(path.read_text())
        if "rows" not in record:  # an older file not written by run.py
            continue
        for png in plot_record(record, args.out, path.stem):
            written.append(png)
            print(f"wrote {png}")
    return written


if __name__ == "__main__":
    main()
