"""Per-step training metrics: measurement, the metrics.jsonl log, the progress bar and the summary.

Definitions (the same in the progress bar, metrics.jsonl and the summary):
    tokens_per_s   input tokens of the step (batch x seq_len x grad_accum) / wall seconds of the step.
    model_tflops   6 * parameters * tokens / step seconds / 1e12: the useful work of a dense
                   transformer's forward (2N) and backward (4N) per token, ignoring attention's
                   quadratic term and any recompute (the convention of the Fuyou and ZeRO papers).
    peak_gpu_bytes torch.cuda.max_memory_allocated since the run began (0 on the CPU).
    peak_cpu_bytes the process's peak resident set (getrusage ru_maxrss).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fuyou.measure import Measurement


def peak_cpu_bytes() -> int:
    """Peak resident set size of this process in bytes (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_gpu_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated(device)


@dataclass
class StepMetrics:
    """One line of metrics.jsonl."""

    step: int  # 1-based optimizer step
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # cumulative input tokens after this step
    step_tokens: int
    step_s: float
    tokens_per_s: float
    model_tflops: float
    peak_gpu_bytes: int
    peak_cpu_bytes: int


def model_tflops(num_parameters: int, num_tokens: int, seconds: float) -> float:
    return 6.0 * num_parameters * num_tokens / seconds / 1e12


@dataclass
class TrainSummary:
    """What a finished (or interrupted) run did.

    Throughput averages exclude the first step, which pays one-time start-up (allocator warm-up,
    kernel selection), unless the run had only one step; with a `measurement`, throughput is its
    window's (the steps after the first, each with its own optimizer updates, drained at both ends). `measurement` (fuyou.measure) covers the
    same steps and adds hardware TFLOPS, memory peaks, bytes moved and energy; `format()` prints it
    as `fuyou profile` does.
    """

    steps: int
    first_loss: float
    final_loss: float
    tokens: int
    tokens_per_s: float
    s_per_10k_tokens: float
    model_tflops: float
    peak_gpu_bytes: int
    peak_cpu_bytes: int
    wall_s: float
    output_dir: str | None
    measurement: Measurement | None = None

    @classmethod
    def from_steps(cls, steps: list[StepMetrics], wall_s: float, output_dir: str | None,
                   measurement: Measurement | None = None) -> TrainSummary:
        assert steps, "a summary needs at least one step"
        timed = steps[1:] if len(steps) > 1 else steps
        seconds = sum(s.step_s for s in timed)
        tokens = sum(s.step_tokens for s in timed)
        tokens_per_s = tokens / seconds
        model_tflops = sum(s.model_tflops * s.step_s for s in timed) / seconds
        if measurement is not None:
            # The measured window is exact where per-step times are not: a step's optimizer updates
            # may run on into the next step (deferred after clipping), and the window starts with the
            # first step's drained and ends with the last step's.
            tokens_per_s, model_tflops = measurement.tokens_per_s, measurement.model_tflops
        return cls(
            steps=len(steps),
            first_loss=steps[0].loss,
            final_loss=steps[-1].loss,
            tokens=steps[-1].tokens,
            tokens_per_s=tokens_per_s,
            s_per_10k_tokens=1e4 / tokens_per_s,
            model_tflops=model_tflops,
            peak_gpu_bytes=max(s.peak_gpu_bytes for s in steps),
            peak_cpu_bytes=max(s.peak_cpu_bytes for s in steps),
            wall_s=wall_s,
            output_dir=output_dir,
            measurement=measurement,
        )

    def format(self) -> str:
        if self.measurement is not None:
            from fuyou.measure import format_table

            before = [("steps", str(self.steps)), ("loss", f"{self.first_loss:.4f} -> {self.final_loss:.4f}"),
                      ("tokens", f"{self.tokens:,}")]
            after = [("wall time", f"{self.wall_s:.1f} s")] + ([("outputs", self.output_dir)] if self.output_dir else [])
            return format_table(self.measurement, before=before, after=after)
        lines = [
            f"steps            {self.steps}",
            f"loss             {self.first_loss:.4f} -> {self.final_loss:.4f}",
            f"tokens           {self.tokens:,}",
            f"tokens/s         {self.tokens_per_s:,.0f}",
            f"s per 10k tokens {self.s_per_10k_tokens:.3f}",
            f"model TFLOPS     {self.model_tflops:.2f}",
            f"peak GPU memory  {self.peak_gpu_bytes / 2**30:.2f} GiB",
            f"peak CPU memory  {self.peak_cpu_bytes / 2**30:.2f} GiB",
            f"wall time        {self.wall_s:.1f} s",
        ]
        if self.output_dir:
            lines.append(f"outputs          {self.output_dir}")
        return "\n".join(lines)


class MetricsLog:
    """Appends one JSON object per step to `path` and flushes it, so a crash keeps every finished step."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file: IO[str] | None = None

    def write(self, metrics: StepMetrics) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = self.path.open("w")
        self._file.write(json.dumps(asdict(metrics)) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress_postfix(metrics: StepMetrics) -> str:
    """The progress bar's right-hand side: loss, speed, and memory."""
    text = (
        f"loss {metrics.loss:.4f} | {metrics.tokens_per_s:,.0f} tok/s | {metrics.model_tflops:.2f} TFLOPS"
        f" | cpu {metrics.peak_cpu_bytes / 2**30:.1f} GiB"
    )
    if metrics.peak_gpu_bytes:
        text += f" | gpu {metrics.peak_gpu_bytes / 2**30:.1f} GiB"
    return text
