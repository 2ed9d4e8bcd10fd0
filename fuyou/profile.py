"""`fuyou profile`: warm-up steps, measured steps, and what they cost, for one config or a sweep of configs.

One profile (`profile_config`) builds the same `Trainer` as `fuyou train`, runs `warmup` steps, then
`steps` measured steps under a `fuyou.measure.Meter`, with the runtime's traces on (the store's moves,
the CPU optimizer's tasks, the schedule's compute spans; see fuyou.timeline), and keeps the timeline
of the last measured step (until the work it queued is done). `write_profile` writes, into a directory:
    profile.json   the resolved config, device, the measurement (fuyou.measure), each measured step,
                   and the timeline's lanes (spans, busy seconds and share of the step, bytes)
    profile.csv    the measurement as one header line and one row (the same numbers as the JSON)
    timeline.png   the step's lanes: compute, H2D, D2H, SSD read, SSD write, CPU optimizer
    trace.json     the same step as a Chrome trace (open it in ui.perfetto.dev)
A sweep (`--sweep key=v1,v2 ...`, several keys: every combination) profiles each point into
`point-NN/` and writes one table: sweep.csv, sweep.json, and sweep_tokens_per_s.png and
sweep_vram.png against the first swept key (a line per combination of the others). A point that
fails (out of memory, say) is a row with its error; the sweep goes on.

Every mistake in the input (config, sweep keys and values, output directory) is raised as a
`FuyouError` before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import itertools
import json
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyou.config import TrainConfig
from fuyou.errors import ConfigError, FuyouError
from fuyou.measure import Measurement, format_table
from fuyou.metrics import StepMetrics
from fuyou.runtime import FuyouRuntime
from fuyou.timeline import RuntimeTrace, Span, Timeline, write_chrome_trace, write_png
from fuyou.trainer import Trainer

PROFILE_FILES = ("profile.json", "profile.csv", "timeline.png", "trace.json")
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep_tokens_per_s.png", "sweep_vram.png")
REFERENCE_LANES_NOTE = "runtime=reference has no tiered store: one compute span per step, no transfer or optimizer lanes"


@dataclass
class ProfileResult:
    """One profiled config: its figures, its measured steps and one step's timeline."""

    config: TrainConfig
    device: str
    warmup_steps: int
    measurement: Measurement
    steps: list[StepMetrics]
    timeline: Timeline
    lanes_note: str | None

    def to_json(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "device": self.device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "torch": torch.__version__,
            "warmup_steps": self.warmup_steps,
            "measurement": self.measurement.to_dict(),
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "timeline": {"title": self.timeline.title, "window_s": self.timeline.end_s - self.timeline.start_s,
                         "lanes": self.timeline.lane_summary(), "note": self.lanes_note},
        }


def profile_config(config: TrainConfig, *, warmup: int, steps: int, log: Callable[[str], None] = lambda line: None) -> ProfileResult:
    """Runs `warmup` then `steps` measured optimizer steps of `config` (module docstring).

    Raises:
        FuyouError: anything wrong with the config, or the run does not fit.
    """
    if warmup < 0 or steps < 1:
        raise ConfigError(f"--warmup must be >= 0 and --steps >= 1; got --warmup {warmup} --steps {steps}")
    config = config.with_overrides([f"train.steps={warmup + steps}", "train.save_final=false"], origin="profile")
    trainer = Trainer(config, output_dir=None, progress=False)
    runtime = trainer.runtime
    fuyou = isinstance(runtime, FuyouRuntime)
    meter = None
    try:
        for index in range(warmup):
            log(f"warm-up step {index + 1}/{warmup}: {trainer.step().step_s:.2f} s")
        trainer.drain()
        trace = RuntimeTrace(runtime) if fuyou else None
        if trace is not None:  # traces on for the measured steps only
            trace.start()
        meter = trainer.meter().start(reset_peaks=True)
        history, windows = [], []
        for index in range(steps):
            start_s = time.perf_counter()
            metrics = trainer.step()
            windows.append((start_s, time.perf_counter()))
            meter.add_step(metrics.step_tokens)
            history.append(metrics)
            log(f"measured step {index + 1}/{steps}: {metrics.step_s:.2f} s")
        trainer.drain()
        drained_s = time.perf_counter()
        measurement = meter.stop()
        if trace is not None:
            spans = trace.stop()
            lanes = trace.lanes(spans)
            note = None
        else:
            spans = [Span("compute", f"step {warmup + index + 1}", start_s, end_s) for index, (start_s, end_s) in enumerate(windows)]
            lanes, note = ("compute",), REFERENCE_LANES_NOTE
    finally:
        if meter is not None:
            meter.close()
        trainer.close()
        if trainer.device.type == "cuda":  # the next sweep point's reserved peak must not count this one's cache
            del runtime, trainer.runtime, trainer.model
            gc.collect()
            torch.cuda.empty_cache()
    title = f"step {warmup + steps}: {_describe(config)} on {_device_name(trainer.device)}"
    timeline = Timeline.of(spans, windows[-1][0], drained_s, lanes, title)
    return ProfileResult(config, _device_name(trainer.device), warmup, measurement, history, timeline, note)


def _describe(config: TrainConfig) -> str:
    model = config.model.path or config.model.preset
    train = config.train
    text = f"runtime={config.runtime} {model} batch {train.batch_size}x{train.seq_len}x{train.grad_accum}"
    if config.runtime == "fuyou":
        offload = config.offload
        text += f" params={offload.params or 'cpu'} optimizer={offload.optimizer or 'cpu'} activations={offload.activations or 'cpu'}"
    return text


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- files ------------------------------------------------------------------------------------------


def csv_row(measurement: Measurement) -> dict:
    """The measurement as one CSV row (None as an empty cell)."""
    return {key: "" if value is None else value for key, value in measurement.to_dict().items()}


def write_profile(result: ProfileResult, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "profile.json").write_text(json.dumps(result.to_json(), indent=1))
    row = csv_row(result.measurement)
    with (directory / "profile.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    write_chrome_trace(result.timeline, directory / "trace.json")
    try:
        write_png(result.timeline, directory / "timeline.png")
    except ImportError:  # a GPU machine without matplotlib: the measurement must not be lost for a picture
        warnings.warn(f"matplotlib is not installed: no {directory / 'timeline.png'}; draw it elsewhere with "
                      f"python -m fuyou.timeline {directory / 'trace.json'} timeline.png")


def check_output_dir(directory: Path, overwrite: bool) -> None:
    """Refuses a file, or a non-empty directory without `overwrite` (as `fuyou train` does)."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--output {directory} is a file; pass a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {directory} is not empty; pass a new --output directory or --overwrite")


# ---- sweeps ---------------------------------------------------------------------------------------------


def parse_sweeps(config: TrainConfig, sweeps: list[str]) -> list[list[str]]:
    """`key=v1,v2,...` arguments as the override lists of every point (all combinations, first key slowest).

    Every point's config is built and validated here, so a bad key or value stops the run before it starts.

    Raises:
        ConfigError: not key=v1,v2; a key given twice; an unknown key; a value of the wrong type or range.
    """
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--sweep '{sweep}' is not key=v1,v2,... (e.g. --sweep train.batch_size=4,8,16)")
        if key in (axis_key for axis_key, _ in axes):
            raise ConfigError(f"--sweep {key} is given twice; list all its values in one --sweep")
        axes.append((key, [value.strip() for value in values.split(",")]))
    points = [[f"{key}={value}" for (key, _), value in zip(axes, combination)]
              for combination in itertools.product(*(values for _, values in axes))]
    for point in points:
        config.with_overrides(point, origin="--sweep")
    return points


def run_sweep(config: TrainConfig, points: list[list[str]], output: Path, *, warmup: int, steps: int,
              log: Callable[[str], None]) -> list[dict]:
    """Profiles every point into output/point-NN/ and writes the sweep's table and plots; returns its rows.

    Raises:
        FuyouError: every point failed (the first point's error); nothing is written then.
    """
    rows, errors = [], []
    for index, point in enumerate(points):
        log(f"point {index + 1}/{len(points)}: {' '.join(point)}")
        values = dict(override.split("=", 1) for override in point)
        try:
            result = profile_config(config.with_overrides(point, origin="--sweep"), warmup=warmup, steps=steps, log=log)
        except FuyouError as error:
            log(f"point {' '.join(point)} failed: {error}")
            errors.append(error)
            rows.append({**values, "directory": None, "error": str(error)})
            continue
        directory = output / f"point-{index:02d}"
        write_profile(result, directory)
        rows.append({**values, "directory": directory.name, "error": None, **result.measurement.to_dict()})
    if len(errors) == len(points):
        raise errors[0]
    output.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    (output / "sweep.json").write_text(json.dumps({"swept": [o.split("=")[0] for o in points[0]], "rows": rows}, indent=1))
    with (output / "sweep.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows([{key: "" if row.get(key) is None else row.get(key) for key in keys} for row in rows])
    swept = [override.split("=")[0] for override in points[0]]
    try:
        _plot_sweep(rows, swept, output)
    except ImportError:
        warnings.warn("matplotlib is not installed: no sweep plots (sweep.csv and sweep.json have the numbers)")
    return rows


def _plot_sweep(rows: list[dict], swept: list[str], output: Path) -> None:
    """tokens/s and memory against the first swept key, one line per combination of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, others = swept[0], swept[1:]
    done = [row for row in rows if row["error"] is None]
    x_labels = list(dict.fromkeys(row[first] for row in rows))
    on_gpu = any(row.get("peak_gpu_allocated_bytes") is not None for row in done)
    memory_keys = (("peak_gpu_allocated_bytes", "allocated"), ("peak_gpu_reserved_bytes", "reserved"),
                   ("peak_gpu_nvml_used_bytes", "NVML")) if on_gpu else (("peak_cpu_rss_bytes", "CPU RSS"),)
    series = {}
    for row in done:
        series.setdefault(" ".join(f"{key}={row[key]}" for key in others), []).append(row)
    plots = [("sweep_tokens_per_s.png", "tokens/s", [("tokens_per_s", "")], 1.0),
             ("sweep_vram.png", "peak GPU memory, GiB" if on_gpu else "peak CPU RSS, GiB (no GPU)", memory_keys, 2**-30)]
    for name, ylabel, keys, scale in plots:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for label, group in series.items():
            for key, what in keys:
                points = [(x_labels.index(row[first]), row[key] * scale) for row in group if row.get(key) is not None]
                if points:
                    text = ", ".join(part for part in (label, what) if part) or None
                    axes.plot(*zip(*points), marker="o", label=text)
        axes.set_xticks(range(len(x_labels)))
        axes.set_xticklabels(x_labels)
        axes.set_xlabel(first)
        axes.set_ylabel(ylabel)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[1]:
            axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(output / name, dpi=110)
        plt.close(figure)


def format_sweep(rows: list[dict], swept: list[str]) -> str:
    """One line per point: its swept values and the headline figures (or its error)."""
    header = swept + ["tokens/s", "s/10k tok", "model TFLOPS", "hw TFLOPS", "util", "GPU alloc GiB", "GPU resv GiB",
                      "CPU RSS GiB", "energy J"]
    lines = [header]
    for row in rows:
        values = [str(row[key]) for key in swept]
        if row["error"] is not None:
            lines.append(values + [f"failed: {row['error']}"])
            continue
        number = lambda value, spec: "n/a" if value is None else format(value, spec)
        lines.append(values + [
            number(row["tokens_per_s"], ",.0f"), number(row["s_per_10k_tokens"], ".3f"), number(row["model_tflops"], ".2f"),
            number(row["hardware_tflops"], ".2f"), number(row["utilisation"], ".1%"),
            number(row["peak_gpu_allocated_bytes"] and row["peak_gpu_allocated_bytes"] / 2**30, ".2f"),
            number(row["peak_gpu_reserved_bytes"] and row["peak_gpu_reserved_bytes"] / 2**30, ".2f"),
            number(row["peak_cpu_rss_bytes"] / 2**30, ".2f"), number(row["energy_j"], ".1f"),
        ])
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


# ---- the command ------------------------------------------------------------------------------------------


def run_profile(config: TrainConfig, *, warmup: int, steps: int, sweeps: list[str], output: Path, overwrite: bool,
                quiet: bool = False) -> str:
    """`fuyou profile`: profile one config or a sweep into `output`; returns the table to print.

    Raises:
        FuyouError: a mistake in the input (nothing written), or nothing could be profiled.
    """
    log = (lambda line: None) if quiet else (lambda line: print(f"fuyou profile: {line}", file=sys.stderr))
    if warmup < 0 or steps < 1:
        raise ConfigError(f"--warmup must be >= 0 and --steps >= 1; got --warmup {warmup} --steps {steps}")
    points = parse_sweeps(config, sweeps) if sweeps else None
    check_output_dir(output, overwrite)
    if overwrite and output.is_dir():
        for name in PROFILE_FILES + SWEEP_FILES:
            (output / name).unlink(missing_ok=True)
        for directory in output.glob("point-*"):
            shutil.rmtree(directory)
    if points is None:
        result = profile_config(config, warmup=warmup, steps=steps, log=log)
        write_profile(result, output)
        return format_table(result.measurement, before=[("config", _describe(result.config)), ("device", result.device)],
                            after=[("timeline lanes", ", ".join(result.timeline.lanes) + (f" ({result.lanes_note})" if result.lanes_note else "")),
                                   ("outputs", str(output))])
    rows = run_sweep(config, points, output, warmup=warmup, steps=steps, log=log)
    swept = [override.split("=")[0] for override in points[0]]
    return format_sweep(rows, swept) + f"\noutputs: {output}"
