"""Fuyou against DeepSpeed on one model, batch and set of caps (issue 6), run through benchmarks.run:

    source benchmarks/device/setup_deepspeed.sh      # on the GPU machine: DeepSpeed from carried wheels
    python -m benchmarks.run --case ssd-1.3b --case ram-2.7b [--system fuyou --system zero-infinity] [--timeline on]

With `--timeline`, each system also draws one step as a timeline (same lanes for both: compute, H2D, D2H,
SSD read/write, CPU optimizer), into `<case>-<system>-timeline/` of the log archive (`run_comparison`).

Each system runs in its own subprocess with a time limit, one after another, so none shares memory, page
cache or pinned buffers with another: Fuyou's side is a `benchmarks.run` Case trained in a child
(`--case NAME --set offload.ssd_dir=... --json-out ...`), the baselines are
`benchmarks.deepspeed_baseline --mode zero-infinity|zero-offload|pytorch` with the same preset, batch,
grad_accum, seq_len, steps and GPU cap. Each system's swap files go under `--ssd-dir/<case>-<system>`
and are removed before the next system starts. The parent takes each child's peak RSS from wait4 (the
same measure for every system); per-step seconds, losses and /proc/self/io disk bytes come from the child.

Result (benchmarks/results/<case>.json): case, description, device, date, commit, command, the caps,
the shape, `metrics` (one object per system: status, step times and losses, mean step s over steps 2..,
tokens/s, model TFLOPS (6·N·tokens/s), hardware TFLOPS (8·N·tokens/s: every block's forward is recomputed
on both sides), peak VRAM allocated/reserved, peak RSS, SSD bytes read/written per timed step, swap-file
bytes, wall seconds), `baseline` (the system the case's goal is stated against) and `ratio` (Fuyou's model
TFLOPS over each baseline's). Each child's log and JSON go to a temporary directory, archived as
$OUT/<case>-logs.tar.gz where $OUT is set (the device tool's folder, which returns at most 8 files);
benchmarks.run copies the result to $OUT/<case>.json too.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30


@dataclass(frozen=True)
class Comparison:
    """One model, batch and set of caps measured under Fuyou and DeepSpeed baselines.

    Fuyou's side is the benchmarks.run Case `fuyou_case`; preset, batch_size, grad_accum, seq_len and steps
    must be that case's (tests/test_deepspeed_baseline.py checks). Caps: the GPU cap is enforced on every
    system (Fuyou's offload.gpu_memory_gb; set_per_process_memory_fraction for the baselines). The CPU cap
    is the RAM the case models; DeepSpeed has no such setting, so it is not enforced on any system, and each
    system's peak RSS is reported against it (`within_cpu_cap`).
    """

    name: str
    description: str
    fuyou_case: str
    preset: str
    batch_size: int
    grad_accum: int
    seq_len: int
    steps: int
    baselines: tuple[str, ...]
    baseline: str  # the baseline the case's goal is stated against
    cpu_memory_gb: float
    gpu_memory_gb: float = 24.0
    timeout_s: int = 240  # per system
    # Fuyou's (micro-batch, grad_accum) where it differs from the baselines' (batch_size, grad_accum): the
    # same sequences per step, each system at the micro-batch it runs best under the same caps.
    fuyou_batch: tuple[int, int] | None = None

    def systems(self) -> tuple[str, ...]:
        return ("fuyou", *self.baselines)

    def baseline_command(self, mode: str, nvme_dir: str, json_out: str) -> list[str]:
        return [
            sys.executable, "-m", "benchmarks.deepspeed_baseline", "--mode", mode, "--preset", self.preset,
            "--batch-size", str(self.batch_size), "--grad-accum", str(self.grad_accum), "--seq-len", str(self.seq_len),
            "--steps", str(self.steps), "--gpu-memory-gb", str(self.gpu_memory_gb), "--nvme-dir", nvme_dir,
            "--json-out", json_out,
        ]


COMPARISONS = [
    Comparison(
        "ssd-1.3b",
        "SSD path, GPT-3 1.3B, batch 8 x 2048, 3 steps (2-3 timed), GPU 24 GiB, RAM modelled as 24 GiB: Fuyou "
        "with the optimizer state split between the RAM the cap leaves (16 of 24 blocks) and the SSD against "
        "ZeRO-Infinity (weights and optimizer state on NVMe, which has no such split); "
        "ZeRO-Offload and PyTorch for reference. 1.3B rather than 2.7B: ZeRO-Infinity at 2.7B moves ~80 GB a "
        "step through the ~1.5-2.4 GB/s disk (~4 min for 3 steps), which with Fuyou's side does not fit the "
        "10-minute call next to ram-2.7b; ssd-2.7b runs that shape alone",
        "fuyou-1.3b-split-b8-ga1",
        "gpt3-1.3b", 8, 1, 2048, 3,
        ("zero-infinity", "zero-offload", "pytorch"), "zero-infinity", cpu_memory_gb=24.0, timeout_s=420,
    ),
    Comparison(
        "ram-2.7b",
        "RAM path, GPT-3 2.7B, batch 8 x 2048 x grad_accum 4, 5 steps (2-5 timed), GPU 24 GiB, RAM 64 GiB: Fuyou "
        "with every state in RAM against ZeRO-Offload (optimizer on the CPU); PyTorch needs 42 GB, over the cap",
        "fuyou-2.7b-ram-b8-ga4",
        "gpt3-2.7b", 8, 4, 2048, 5,
        ("zero-offload", "pytorch"), "zero-offload", cpu_memory_gb=64.0,
    ),
    Comparison(
        "ram-2.7b-best",
        "RAM path, GPT-3 2.7B, 32 sequences x 2048 per step, 5 steps (2-5 timed), GPU 24 GiB, RAM 64 GiB, each "
        "system at its best micro-batch under the cap: Fuyou 32 x 1 (activations swapped to RAM, issue-4 "
        "section), ZeRO-Offload 8 x 4 (its 8 x 2048 micro-batch already reserves 18 GiB of the 24)",
        "fuyou-2.7b-ram-b32-ga1",
        "gpt3-2.7b", 8, 4, 2048, 5,
        ("zero-offload",), "zero-offload", cpu_memory_gb=64.0, fuyou_batch=(32, 1),
    ),
    Comparison(
        "ssd-2.7b",
        "SSD path, GPT-3 2.7B, batch 8 x 2048, 3 steps (2-3 timed), GPU 24 GiB, RAM 48 GiB: Fuyou with the "
        "optimizer state on the SSD against ZeRO-Infinity; about 7 minutes, so a call of its own",
        "fuyou-2.7b-ssd-b8-ga1",
        "gpt3-2.7b", 8, 1, 2048, 3,
        ("zero-infinity",), "zero-infinity", cpu_memory_gb=48.0, timeout_s=330,
    ),
]


def fuyou_metrics(result: dict, warmup_steps: int = 1) -> dict:
    """A benchmarks.run Case result in the per-system shape of deepspeed_baseline's."""
    from benchmarks.deepspeed_baseline import throughput

    steps = result["steps"]
    timed = steps[warmup_steps:] or steps
    tokens_per_step = result["metrics"]["tokens"] // result["metrics"]["steps"]
    ssd = ((result.get("runtime_stats") or {}).get("store") or {}).get("ssd") or {}
    rates = throughput(result["parameters"], tokens_per_step, [s["step_s"] for s in steps], warmup_steps)
    read_per_step = sum(s.get("io", {}).get("read_bytes", 0) for s in timed) / len(timed)
    write_per_step = sum(s.get("io", {}).get("write_bytes", 0) for s in timed) / len(timed)
    window = result["metrics"].get("measurement")
    if window:
        # Fuyou's per-step times can shift work between steps (updates deferred after a clipped step
        # finish in the next one; the trainer drains step 1's before measuring): its measured window
        # (steps 2.. with their own updates, drained at both ends) is the rate, and its bytes too.
        num_timed = window["steps"]
        rates = throughput(result["parameters"], tokens_per_step, [tokens_per_step / window["tokens_per_s"]], 0)
        read_per_step = (window.get("ssd_read_bytes") or 0) / num_timed
        write_per_step = (window.get("ssd_write_bytes") or 0) / num_timed
    return {
        "status": "ok",
        "parameters": result["parameters"],
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "measured_steps": [s["step"] for s in timed],
        **rates,
        "ssd_read_bytes_per_step": read_per_step,
        "ssd_write_bytes_per_step": write_per_step,
        "swap_file_bytes": ssd.get("peak_bytes"),
        "peak_vram_allocated_bytes": result["metrics"]["peak_gpu_bytes"],
        "peak_vram_reserved_bytes": result.get("peak_gpu_reserved_bytes"),
        "command": result["command"],
        "runtime_stats": result.get("runtime_stats"),
        "timeline": result.get("timeline"),
    }


def baseline_metrics(result: dict) -> dict:
    """A deepspeed_baseline result with `status` ("ok" or "does not fit") and `swap_file_bytes` added."""
    swap = result.get("swap_files") or {}
    return {"status": "ok" if result.get("fits") else "does not fit", **result, "swap_file_bytes": swap.get("allocated_bytes")}


def fuyou_ratios(metrics: dict[str, dict]) -> dict[str, float | None]:
    """Fuyou's model TFLOPS over each other system's (None where either did not run)."""
    fuyou_tflops = metrics.get("fuyou", {}).get("model_tflops")
    return {
        system: fuyou_tflops / entry["model_tflops"] if fuyou_tflops and entry.get("model_tflops") else None
        for system, entry in metrics.items()
        if system != "fuyou"
    }


def run_child(command: list[str], timeout_s: float, log_path: Path) -> tuple[int | str, float, int]:
    """Runs `command` in a process group of its own, killing that group after `timeout_s`.

    Returns:
        The exit code (or "timeout"), wall seconds, and the child's peak RSS in bytes (wait4's ru_maxrss,
        which covers the child and the descendants it reaped).
    """
    start_s = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    code: int | str = "timeout" if timed_out.is_set() else process.returncode
    return code, time.perf_counter() - start_s, usage.ru_maxrss * 1024


def run_comparison(comparison: Comparison, only_systems: list[str], ssd_dir: Path, baseline_args: list[str] = (),
                   timelines: bool = False) -> dict:
    """Runs comparison.systems() (those in `only_systems`, if any) one after another; the issue-6 result.

    `baseline_args` are appended to every DeepSpeed baseline's command (e.g. --no-pipeline). `timelines`:
    each system also draws one step (Fuyou its last, traced and timed; DeepSpeed one more, profiled and
    untimed) into `<case>-<system>-timeline/` of the log archive, and its lanes go into the metrics.
    """
    from benchmarks.run import _commit, _device_name

    log_dir = Path(tempfile.mkdtemp(prefix=f"fuyou-compare-{comparison.name}-"))
    systems = [system for system in comparison.systems() if not only_systems or system in only_systems]
    metrics: dict[str, dict] = {}
    for system in systems:
        json_out = log_dir / f"{comparison.name}-{system}.json"
        log_path = log_dir / f"{comparison.name}-{system}.log"
        swap_dir = ssd_dir / f"{comparison.name}-{system}"
        if system == "fuyou":
            command = [sys.executable, "-m", "benchmarks.run", "--case", comparison.fuyou_case,
                       "--set", f"offload.ssd_dir={swap_dir}", "--json-out", str(json_out)]
        else:
            command = [*comparison.baseline_command(system, str(swap_dir), str(json_out)), *baseline_args]
        if timelines:
            command += ["--timeline", str(log_dir / f"{comparison.name}-{system}-timeline")]
        print(f"[{comparison.name}] {system}: {shlex.join(command)}", flush=True)
        json_out.unlink(missing_ok=True)
        swap_dir.mkdir(parents=True, exist_ok=True)
        try:
            code, wall_s, child_rss = run_child(command, comparison.timeout_s, log_path)
        finally:
            shutil.rmtree(swap_dir, ignore_errors=True)  # the next system gets the whole disk
        if code == 0 and json_out.exists():
            result = json.loads(json_out.read_text())
            entry = fuyou_metrics(result) if system == "fuyou" else baseline_metrics(result)
        else:
            entry = {"status": f"failed ({code})", "log_tail": log_path.read_text(errors="replace")[-2000:]}
        entry.update(wall_s=wall_s, peak_rss_bytes=child_rss, within_cpu_cap=child_rss <= comparison.cpu_memory_gb * GIB,
                     system_command=shlex.join(["python", *command[1:]]))
        metrics[system] = entry
        rate = f", {entry['model_tflops']:.1f} model TFLOPS" if "model_tflops" in entry else ""
        print(f"[{comparison.name}] {system}: {entry['status']} in {wall_s:.0f} s{rate}", flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:  # the device tool returns at most 8 files: one archive of the children's logs per case
        with tarfile.open(Path(out_dir) / f"{comparison.name}-logs.tar.gz", "w:gz") as archive:
            archive.add(log_dir, arcname=f"{comparison.name}-logs")
    return {
        "case": comparison.name,
        "description": comparison.description,
        "device": _device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "command": shlex.join(["python", "-m", "benchmarks.run", "--case", comparison.name,
                               *[arg for system in only_systems for arg in ("--system", system)],
                               *[f"--baseline-arg={arg}" for arg in baseline_args],
                               *(["--timeline", "DIR"] if timelines else [])]),
        "caps": {"gpu_memory_gb": comparison.gpu_memory_gb, "cpu_memory_gb": comparison.cpu_memory_gb, "cpu_cap_enforced": False},
        "shape": {"preset": comparison.preset, "batch_size": comparison.batch_size, "grad_accum": comparison.grad_accum,
                  "fuyou_batch": comparison.fuyou_batch,
                  "seq_len": comparison.seq_len, "steps": comparison.steps, "timed_steps": list(range(2, comparison.steps + 1))},
        "metrics": metrics,
        "baseline": comparison.baseline,
        "ratio": fuyou_ratios(metrics),
    }


def comparison_table(rows: list[dict]) -> str:
    """Markdown, one line per system of each comparison, with Fuyou's model-TFLOPS ratio to it."""
    lines = [
        (
            "| case | system | status | step s | tokens/s | model TFLOPS | hardware TFLOPS | peak VRAM GiB alloc / reserved "
            "| peak RSS GiB | SSD GB read / written per step | swap files GB | Fuyou ÷ system |"
        ),
        "|---|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for row in rows:
        for system, m in row["metrics"].items():
            rss = f"{m['peak_rss_bytes'] / GIB:.1f}"
            if "model_tflops" in m:
                numbers = (
                    f"{m['mean_step_s']:.2f} | {m['tokens_per_s']:,.0f} | {m['model_tflops']:.1f} | {m['hardware_tflops']:.1f} | "
                    f"{(m.get('peak_vram_allocated_bytes') or 0) / GIB:.1f} / {(m.get('peak_vram_reserved_bytes') or 0) / GIB:.1f} | {rss} | "
                    f"{m['ssd_read_bytes_per_step'] / 1e9:.1f} / {m['ssd_write_bytes_per_step'] / 1e9:.1f} | "
                    f"{(m.get('swap_file_bytes') or 0) / 1e9:.1f}"
                )
            else:
                need = f" (needs {m['need_bytes'] / GIB:.1f} GiB)" if m.get("need_bytes") else ""
                numbers = f"—{need} | — | — | — | — | {rss} | — | —"
            ratio = row["ratio"].get(system)
            lines.append(f"| {row['case']} | {system} | {m['status']} | {numbers} | {f'{ratio:.2f}×' if ratio else '—'} |")
    return "\n".join(lines)
