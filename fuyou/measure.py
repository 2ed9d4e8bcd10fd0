"""Measuring a stretch of training steps: throughput, FLOPS, memory peaks, bytes moved and GPU energy.

`Meter` is started before the measured steps and stopped after them (and after the work they queued
has finished); `Meter.stop` returns a `Measurement`, which `fuyou profile` writes out and `fuyou train`
prints at its end (`format_table`, one function for both).

Definitions:
    tokens_per_s        input tokens of the measured steps / wall seconds from the meter's start to its
                        stop (the stop waits for the last step's queued CPU updates and copies).
    s_per_10k_tokens    1e4 / tokens_per_s.
    model_tflops        6 N tokens / seconds (fuyou.metrics.model_tflops; no recompute).
    hardware_tflops     what the device executes: 6 N per token plus 2 x (block parameters recomputed)
                        per token: every block once when blocks are checkpointed (runtime=fuyou always;
                        reference with train.activation_checkpointing), less each block's down
                        projection where the recompute skips it (runtime=fuyou and streamed QLoRA: its
                        output is never read, fuyou.models.transformer), plus L(L-1)/2 whole block
                        forwards more with offload.activations=none (x_j rebuilt from x_0, see
                        fuyou.schedule). Embedding and head are not recomputed. Attention's quadratic
                        term is ignored.
    utilisation         hardware_tflops / the hardware profile's `gpu_tflops` (its dense bf16 GEMM rate;
                        on a CPU profile, the CPU's matmul rate); null without a profile of this device.
    peak GPU bytes      torch's max_memory_allocated / max_memory_reserved, and the most NVML saw in use
                        on the whole device (all processes, the driver's context included).
    peak_cpu_rss_bytes  the largest resident set sampled (every `interval_s`, and at start and stop).
    pinned_peak_bytes   the tiered store's pinned pool at its peak (runtime=fuyou; null otherwise).
    *_bytes moved       the store's legs started while the meter ran (`TieredStore.moved_bytes`).
    energy_j            GPU energy over the measured stretch: NVML's energy counter difference when the
                        GPU has one, else sampled power (NVML, or `nvidia-smi -lms`) integrated over time.
                        Null, with `energy_reason`, where there is no NVIDIA GPU or no way to read it.

pynvml, psutil and subprocesses are used only when a meter runs, so `import fuyou` stays light.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import torch

from fuyou.metrics import model_tflops

NO_GPU = "no NVIDIA GPU"


def flops_per_token(num_parameters: int, block_parameters: int, num_layers: int, *, runtime: str,
                    activations: str | None, activation_checkpointing: bool, skipped_parameters: int = 0) -> float:
    """Hardware FLOPs per input token (module docstring): 6 N plus recomputed block forwards, each less
    `skipped_parameters` (a block's down projection, F·D, where the recompute skips it; 0 where not)."""
    if runtime == "fuyou":
        checkpointed = num_layers
        rebuilt = num_layers * (num_layers - 1) / 2 if activations == "none" else 0
    else:
        checkpointed, rebuilt = (num_layers if activation_checkpointing else 0), 0
    return 6.0 * num_parameters + 2.0 * ((block_parameters - skipped_parameters) * checkpointed + block_parameters * rebuilt)


@dataclass
class Measurement:
    """Figures of one measured stretch of steps (module docstring). Every field is a scalar or None."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    s_per_10k_tokens: float
    num_parameters: int
    model_tflops: float
    hardware_flops_per_token: float
    hardware_tflops: float
    peak_tflops: float | None
    utilisation: float | None
    peak_gpu_allocated_bytes: int | None
    peak_gpu_reserved_bytes: int | None
    peak_gpu_nvml_used_bytes: int | None
    peak_cpu_rss_bytes: int
    pinned_peak_bytes: int | None
    h2d_bytes: int | None
    d2h_bytes: int | None
    ssd_read_bytes: int | None
    ssd_write_bytes: int | None
    energy_j: float | None
    energy_source: str | None
    energy_reason: str | None
    mean_power_w: float | None
    cpu_optimizer_busy_s: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Meter:
    """Measures from `start()` to `stop()`; see the module docstring for what.

    Args:
        device: the compute device.
        num_parameters: N of the model.
        flops_per_token: hardware FLOPs per token (`flops_per_token`).
        peak_tflops: the device's rate from a hardware profile, or None.
        store: the runtime's `TieredStore` (bytes moved, pinned peak), or None (reference runtime).
        optimizer: the runtime's `OffloadedAdamW` (worker busy seconds), or None.
        interval_s: sampling interval of RSS, GPU power and memory.
    """

    def __init__(self, device: torch.device, *, num_parameters: int, flops_per_token: float,
                 peak_tflops: float | None = None, store=None, optimizer=None, interval_s: float = 0.1) -> None:
        self.device, self.num_parameters, self.flops_per_token = device, num_parameters, flops_per_token
        self.peak_tflops, self.store, self.optimizer, self.interval_s = peak_tflops, store, optimizer, interval_s
        self.steps = 0
        self.tokens = 0
        self._running = False

    def start(self, *, reset_peaks: bool) -> Meter:
        """Begin measuring. `reset_peaks`: torch's GPU peaks count from now, else from their last reset."""
        import psutil

        self._process = psutil.Process()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if reset_peaks:
                torch.cuda.reset_peak_memory_stats(self.device)
        self._power = GpuPower.open(self.device)
        self._peak_rss_bytes = self._process.memory_info().rss
        self._moved_at_start = dict(self.store.moved_bytes) if self.store is not None else {}
        self._busy_at_start = sum(self.optimizer.busy_s.values()) if self.optimizer is not None else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="fuyou-meter", daemon=True)
        self._running = True
        self._power.start()  # may wait for nvidia-smi's first sample: before the measured time starts
        self._start_s = time.perf_counter()
        self._thread.start()
        return self

    def add_step(self, num_tokens: int) -> None:
        self.steps += 1
        self.tokens += num_tokens

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_rss_bytes = max(self._peak_rss_bytes, self._process.memory_info().rss)
            self._power.sample()

    def stop(self) -> Measurement:
        """End measuring (the caller has waited for the measured steps' work) and return the figures."""
        assert self._running and self.steps > 0, "stop() a started meter after at least one add_step()"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._start_s
        energy = self.close()
        self._peak_rss_bytes = max(self._peak_rss_bytes, self._process.memory_info().rss)
        on_gpu = self.device.type == "cuda"
        hardware_tflops = self.flops_per_token * self.tokens / seconds / 1e12
        moved = self._moved_bytes()
        tokens_per_s = self.tokens / seconds
        return Measurement(
            steps=self.steps,
            tokens=self.tokens,
            seconds=seconds,
            tokens_per_s=tokens_per_s,
            s_per_10k_tokens=1e4 / tokens_per_s,
            num_parameters=self.num_parameters,
            model_tflops=model_tflops(self.num_parameters, self.tokens, seconds),
            hardware_flops_per_token=self.flops_per_token,
            hardware_tflops=hardware_tflops,
            peak_tflops=self.peak_tflops,
            utilisation=hardware_tflops / self.peak_tflops if self.peak_tflops else None,
            peak_gpu_allocated_bytes=torch.cuda.max_memory_allocated(self.device) if on_gpu else None,
            peak_gpu_reserved_bytes=torch.cuda.max_memory_reserved(self.device) if on_gpu else None,
            peak_gpu_nvml_used_bytes=energy.peak_used_bytes,
            peak_cpu_rss_bytes=self._peak_rss_bytes,
            pinned_peak_bytes=self.store.pool.report()["peak_bytes"] if self.store is not None else None,
            h2d_bytes=moved.get("h2d"),
            d2h_bytes=moved.get("d2h"),
            ssd_read_bytes=moved.get("ssd_read"),
            ssd_write_bytes=moved.get("ssd_write"),
            energy_j=energy.joules,
            energy_source=energy.source,
            energy_reason=energy.reason,
            mean_power_w=energy.joules / seconds if energy.joules is not None else None,
            cpu_optimizer_busy_s=sum(self.optimizer.busy_s.values()) - self._busy_at_start if self.optimizer is not None else None,
        )

    def close(self) -> Energy | None:
        """Stop sampling (idempotent); the energy reading if the meter was running."""
        if not self._running:
            return None
        self._running = False
        end_s = time.perf_counter()
        self._stop.set()
        self._thread.join()
        return self._power.stop(self._start_s, end_s)

    def _moved_bytes(self) -> dict[str, int]:
        if self.store is None:
            return {}
        now = dict(self.store.moved_bytes)
        kinds = ("h2d", "d2h", "ssd_read", "ssd_write")
        return {kind: now.get(kind, 0) - self._moved_at_start.get(kind, 0) for kind in kinds}


# ---- GPU power and memory: NVML, nvidia-smi, or nothing -----------------------------------------------


@dataclass
class Energy:
    joules: float | None
    source: str | None  # how joules was obtained
    reason: str | None  # why joules is None
    peak_used_bytes: int | None  # the most device memory in use NVML reported


class GpuPower:
    """No reading: the base for a machine without an NVIDIA GPU (or without NVML and nvidia-smi)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    @staticmethod
    def open(device: torch.device) -> GpuPower:
        """The best reader this machine offers for `device`: pynvml, else nvidia-smi, else none."""
        if device.type != "cuda":
            return GpuPower(NO_GPU)
        try:
            return NvmlPower(device)
        except Exception as error:  # noqa: BLE001 - pynvml absent or NVML unusable: try the next reader
            nvml_problem = f"{type(error).__name__}: {error}"
        if shutil.which("nvidia-smi"):
            return SmiPower(device)
        return GpuPower(f"neither pynvml ({nvml_problem}) nor nvidia-smi can read the GPU's power; pip install nvidia-ml-py")

    def start(self) -> None:
        pass

    def sample(self) -> None:
        pass

    def stop(self, start_s: float, end_s: float) -> Energy:
        """The energy over [start_s, end_s] (perf_counter seconds), and the peak memory seen."""
        return Energy(None, None, self.reason, None)


class _PowerSamples:
    """Timestamped power samples in watts, integrated over a window with the trapezoid rule (the first
    and last samples held to the window's edges)."""

    def __init__(self) -> None:
        self.times_s: list[float] = []
        self.watts: list[float] = []

    def add(self, watts: float) -> None:
        self.times_s.append(time.perf_counter())
        self.watts.append(watts)

    def joules(self, start_s: float, end_s: float) -> float | None:
        inside = [(t, w) for t, w in zip(self.times_s, self.watts) if start_s <= t <= end_s]
        if not inside:
            return None
        edges = [(start_s, inside[0][1])] + inside + [(end_s, inside[-1][1])]
        return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in itertools.pairwise(edges))


def _cuda_uuid(device: torch.device) -> str | None:
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


class NvmlPower(GpuPower):
    """pynvml: the energy counter (mJ, Volta and later) at start and stop; power and memory sampled."""

    def __init__(self, device: torch.device) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        uuid = _cuda_uuid(device)
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else None
        except pynvml.NVMLError:
            self.handle = None
        if self.handle is None:  # CUDA and NVML number devices alike unless CUDA_VISIBLE_DEVICES remaps them
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        self.samples = _PowerSamples()
        self.peak_used_bytes = 0

    def _energy_mj(self) -> int | None:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except self.nvml.NVMLError:
            return None

    def start(self) -> None:
        self.start_mj = self._energy_mj()
        self.sample()

    def sample(self) -> None:
        try:  # a GPU may not report power (or memory); the energy counter may still work
            self.samples.add(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)  # mW
        except self.nvml.NVMLError:
            pass
        try:
            self.peak_used_bytes = max(self.peak_used_bytes, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except self.nvml.NVMLError:
            pass

    def stop(self, start_s: float, end_s: float) -> Energy:
        self.sample()
        end_mj = self._energy_mj()
        if self.start_mj is not None and end_mj is not None:
            return Energy((end_mj - self.start_mj) / 1e3, "NVML energy counter", None, self.peak_used_bytes or None)
        joules = self.samples.joules(start_s, time.perf_counter())
        reason = None if joules is not None else "NVML reports no power draw for this GPU"
        return Energy(joules, "NVML power samples" if joules is not None else None, reason, self.peak_used_bytes or None)


class SmiPower(GpuPower):
    """`nvidia-smi --query-gpu=power.draw,memory.used -lms 100` in a subprocess, read on a thread."""

    def __init__(self, device: torch.device) -> None:
        self.device_id = _cuda_uuid(device) or str(device.index or 0)
        self.samples = _PowerSamples()
        self.peak_used_bytes = 0

    def start(self) -> None:
        command = ["nvidia-smi", f"--id={self.device_id}", "--query-gpu=power.draw,memory.used",
                   "--format=csv,noheader,nounits", "-lms", "100"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.first_sample = threading.Event()
        self.reader = threading.Thread(target=self._read, name="fuyou-nvidia-smi", daemon=True)
        self.reader.start()
        self.first_sample.wait(timeout=5.0)  # nvidia-smi takes a moment to start; measure once it samples

    def _read(self) -> None:
        for line in self.process.stdout:
            fields = [field.strip() for field in line.split(",")]
            try:
                watts, used_mib = float(fields[0]), float(fields[1])
            except (ValueError, IndexError):
                continue  # "[N/A]" on GPUs that do not report power
            self.samples.add(watts)
            self.peak_used_bytes = max(self.peak_used_bytes, int(used_mib * 2**20))
            self.first_sample.set()
        self.first_sample.set()  # nvidia-smi exited: nothing to wait for

    def stop(self, start_s: float, end_s: float) -> Energy:
        exit_code = self.process.poll()  # None: still sampling, as it should be
        self.process.terminate()
        self.process.wait()
        self.reader.join()
        joules = self.samples.joules(start_s, end_s)
        reason = None
        if joules is None:
            reason = (f"nvidia-smi --id={self.device_id} exited with code {exit_code}" if exit_code
                      else "nvidia-smi gave no power sample while measuring (power.draw [N/A] on this GPU?)")
        return Energy(joules, "nvidia-smi power samples" if joules is not None else None, reason, self.peak_used_bytes or None)


# ---- the table ----------------------------------------------------------------------------------------


def _gib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def _gb(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 1e9:.2f} GB"


def format_table(m: Measurement, *, before: list[tuple[str, str]] = (), after: list[tuple[str, str]] = ()) -> str:
    """The measured figures as aligned lines, as `fuyou profile` and the end of `fuyou train` print them.

    Args:
        m: the figures.
        before, after: more (name, value) rows around them, aligned alike.
    """
    utilisation = "n/a (no hardware profile)" if m.utilisation is None else f"{m.utilisation:.1%} of {m.peak_tflops:.1f} TFLOPS"
    energy = f"n/a ({m.energy_reason})" if m.energy_j is None else f"{m.energy_j:.1f} J ({m.mean_power_w:.0f} W mean; {m.energy_source})"
    rows = [
        ("measured steps", f"{m.steps} ({m.tokens:,} tokens in {m.seconds:.2f} s)"),
        ("tokens/s", f"{m.tokens_per_s:,.0f}"),
        ("s per 10k tokens", f"{m.s_per_10k_tokens:.3f}"),
        ("model TFLOPS", f"{m.model_tflops:.2f}"),
        ("hardware TFLOPS", f"{m.hardware_tflops:.2f} (with recompute)"),
        ("utilisation", utilisation),
        ("peak GPU memory", "n/a (no GPU)" if m.peak_gpu_allocated_bytes is None else
                            f"{_gib(m.peak_gpu_allocated_bytes)} allocated, {_gib(m.peak_gpu_reserved_bytes)} reserved, "
                            f"{_gib(m.peak_gpu_nvml_used_bytes)} NVML (whole device)"),
        ("peak CPU RSS", _gib(m.peak_cpu_rss_bytes)),
        ("pinned CPU peak", _gib(m.pinned_peak_bytes)),
        ("PCIe H2D / D2H", f"{_gb(m.h2d_bytes)} / {_gb(m.d2h_bytes)}"),
        ("SSD read / write", f"{_gb(m.ssd_read_bytes)} / {_gb(m.ssd_write_bytes)}"),
        ("GPU energy", energy),
    ]
    if m.cpu_optimizer_busy_s is not None:
        rows.append(("CPU optimizer busy", f"{m.cpu_optimizer_busy_s:.2f} s"))
    rows = list(before) + rows + list(after)
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name:<{width}}{value}" for name, value in rows)
