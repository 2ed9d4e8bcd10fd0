"""A hardware profile: the rates and capacities the cost model needs, measured by `fuyou probe` or
written by hand (configs/hardware/*.yaml), loaded with the same strictness as a run config.

Units (the names carry them): `_tflops` 1e12 FLOP/s, `_gbps` 1e9 bytes/s, memory `_gb` in GiB
(2^30 bytes, like `offload.gpu_memory_gb`), `_gparams_per_s` 1e9 parameters/s.

SSD rates are per drive; `ssd_count` drives are striped (RAID-0), so the array's rate is count x rate.
A GPU field of 0 means "absent" (the probe writes 0 where it could not measure, and says why in
`source`); `compute_device: cpu` describes a machine without a GPU, where `gpu_tflops` is the CPU's
matmul rate and `h2d_gbps`/`d2h_gbps` its memory-copy rate (the runtime's "transfers" are copies).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from fuyou.config import _coerce, _suggest, load_yaml  # the project's one strict YAML checker
from fuyou.errors import ConfigError

COMPUTE_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class HardwareProfile:
    """Rates and capacities of one machine.

    Attributes:
        name: a label, e.g. "rtx4090-12ssd".
        compute_device: "cuda" or "cpu" (no GPU: the CPU computes, see the module docstring).
        gpu_tflops: dense bf16 GEMM rate the blocks' matmuls run at (measured, or a datasheet figure).
        gpu_fp8_tflops: FP8 GEMM rate; 0 where the GPU has none or it was not measured.
        gpu_memory_gb: device memory, GiB.
        h2d_gbps, d2h_gbps: pinned host<->device copy rates, each direction alone.
        pcie_duplex_gbps: both directions at once, summed; None means each direction keeps its own rate.
        cpu_memory_gb: RAM usable for the run, GiB.
        cpu_adam_gparams_per_s: CPU AdamW update rate (fp32 master + 2 moments).
        ssd_read_gbps, ssd_write_gbps: one drive's sequential rates.
        ssd_count: drives striped together (0: no SSD).
        ssd_capacity_gb: free space on the array for swap files, GiB (None: unknown, not checked).
        block_efficiency: the fraction of `gpu_tflops` a whole transformer block's forward + backward
            achieves (hardware FLOPs, full S x S attention counted) under bf16 autocast: norms,
            activations, residual adds, attention and kernel launches included. The probe measures it
            on one GPT-style block (shape in `source`); None: 1.0, every FLOP at the GEMM rate.
        cpu_memory_gbps: bytes per second (read + written) of a plain CPU pass over large fp32
            tensors, what the optimizer worker's non-AdamW passes run at (weight casts, gradient adds,
            norms); None: those passes are not priced.
        cpu_adam_loaded_gparams_per_s, cpu_memory_loaded_gbps: the same two CPU rates measured the
            way the runtime's optimizer worker meets them: on pinned block-sized groups while the GPU
            computes and pinned copies stream both ways over PCIe (DMA and the optimizer share the
            DRAM; the copies' and the GPU's host threads share the cores). The cost model prices the
            worker at these where given; None: at the rates measured alone.
        cpu_adam_clipped_loaded_gparams_per_s: AdamW under that load with a clip factor, which torch's
            kernel folds in as its `grad_scale` (measured 9% slower than without on the H100 host:
            benchmarks/diag/adam_clip.py). Updates of a clipped step (deferred ones) are priced at it;
            None: at the unclipped rate.
        ssd_duplex_gbps: one drive's bytes per second read + written when reads and writes are in
            flight at once (the optimizer reads one group's state ahead while it writes another's
            behind). The cost model takes a drive's time for r bytes read and w written as
            max(r / read, w / write, (r + w) / duplex); None: reads and writes take turns,
            r / read + w / write.
        source: where the numbers come from (probe command and date, or datasheets).
    """

    name: str
    compute_device: str
    gpu_tflops: float
    gpu_fp8_tflops: float
    gpu_memory_gb: float
    h2d_gbps: float
    d2h_gbps: float
    cpu_memory_gb: float
    cpu_adam_gparams_per_s: float
    ssd_read_gbps: float
    ssd_write_gbps: float
    ssd_count: int
    source: str
    pcie_duplex_gbps: float | None = None
    ssd_capacity_gb: float | None = None
    block_efficiency: float | None = None
    cpu_memory_gbps: float | None = None
    cpu_adam_loaded_gparams_per_s: float | None = None
    cpu_memory_loaded_gbps: float | None = None
    ssd_duplex_gbps: float | None = None
    cpu_adam_clipped_loaded_gparams_per_s: float | None = None

    def __post_init__(self) -> None:
        if self.compute_device not in COMPUTE_DEVICES:
            raise ConfigError(f"hardware.compute_device must be one of {', '.join(COMPUTE_DEVICES)}; got {self.compute_device!r}")
        must_be_positive = ["gpu_tflops", "gpu_memory_gb", "h2d_gbps", "d2h_gbps", "cpu_memory_gb", "cpu_adam_gparams_per_s"]
        if self.ssd_count > 0:
            must_be_positive += ["ssd_read_gbps", "ssd_write_gbps"]
        for key in must_be_positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"hardware.{key} must be > 0, got {getattr(self, key)}")
        for key in ("gpu_fp8_tflops", "ssd_read_gbps", "ssd_write_gbps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"hardware.{key} must be >= 0 (0: absent), got {getattr(self, key)}")
        if self.ssd_count < 0:
            raise ConfigError(f"hardware.ssd_count must be >= 0, got {self.ssd_count}")
        if self.block_efficiency is not None and not 0 < self.block_efficiency <= 1:
            raise ConfigError(f"hardware.block_efficiency must be in (0, 1] or null, got {self.block_efficiency}")
        for key in ("pcie_duplex_gbps", "ssd_capacity_gb", "cpu_memory_gbps", "cpu_adam_loaded_gparams_per_s",
                    "cpu_memory_loaded_gbps", "ssd_duplex_gbps", "cpu_adam_clipped_loaded_gparams_per_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"hardware.{key} must be > 0 or null, got {value}")

    # ---- derived rates: the array, and PCIe both ways ----------------------------------------------

    @property
    def block_tflops(self) -> float:
        """The rate transformer blocks (and the head) are priced at: gpu_tflops x block_efficiency."""
        return self.gpu_tflops * (self.block_efficiency or 1.0)

    @property
    def worker_adam_gparams_per_s(self) -> float:
        """The CPU AdamW rate the optimizer worker is priced at: under the runtime's load where measured."""
        return self.cpu_adam_loaded_gparams_per_s or self.cpu_adam_gparams_per_s

    @property
    def worker_clipped_adam_gparams_per_s(self) -> float:
        """The worker's AdamW rate when the step clips (the clip folded into the kernel), where measured."""
        return self.cpu_adam_clipped_loaded_gparams_per_s or self.worker_adam_gparams_per_s

    @property
    def worker_memory_gbps(self) -> float | None:
        """The worker's plain-pass rate (casts, adds, norms): under load where measured; None: not priced."""
        return self.cpu_memory_loaded_gbps or self.cpu_memory_gbps

    @property
    def ssd_array_duplex_gbps(self) -> float | None:
        """Striped read + write rate with both in flight; None: unknown (they take turns)."""
        return None if self.ssd_duplex_gbps is None else self.ssd_count * self.ssd_duplex_gbps

    @property
    def ssd_array_read_gbps(self) -> float:
        """Striped read rate: drives x one drive's rate (RAID-0 scales with the count)."""
        return self.ssd_count * self.ssd_read_gbps

    @property
    def ssd_array_write_gbps(self) -> float:
        """Striped write rate."""
        return self.ssd_count * self.ssd_write_gbps

    def replace(self, **changes) -> HardwareProfile:
        """A copy with `changes` applied and validated (e.g. more SSDs for a what-if)."""
        return dataclasses.replace(self, **changes)

    # ---- YAML -------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict, origin: str = "hardware profile") -> HardwareProfile:
        """Builds a profile from plain data, strictly: unknown keys, missing keys and wrong types are
        a `ConfigError` naming the key.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: expected a mapping of hardware fields, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in raw.items():
            key = str(key)
            if key not in hints:
                raise ConfigError(f"{origin}: unknown key 'hardware.{key}'{_suggest(key, list(hints), 'hardware.')}")
            values[key] = _coerce(value, hints[key], f"hardware.{key}", origin)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [key for key in required if key not in values]
        if missing:
            raise ConfigError(f"{origin}: missing key(s) {', '.join('hardware.' + k for k in missing)}")
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{origin}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> HardwareProfile:
        """Loads a profile file.

        Raises:
            ConfigError: missing or malformed file, unknown or missing key, wrong type, bad value.
        """
        path = Path(path)
        raw = load_yaml(path, missing=f"hardware profile {path} not found; write one with `fuyou probe --output {path}`")
        return cls.from_dict(raw, origin=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path, header: str = "") -> None:
        """Writes the profile (with `header` as leading comment lines) so that `from_yaml` reads it back."""
        comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
        Path(path).write_text(comment + yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
