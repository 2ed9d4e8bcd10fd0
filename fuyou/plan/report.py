"""`fuyou plan`: a run config + a hardware profile -> the chosen Plan and its predicted breakdown, as text or
one JSON object. The CLI only parses and calls `plan_config` and a formatter.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuyou.config import TrainConfig
from fuyou.models import TransformerConfig, resolve_config
from fuyou.plan.cost_model import GiB, Prediction, gradient_ring_buffers, predict
from fuyou.plan.hardware import HardwareProfile
from fuyou.plan.planner import Caps, PlanError, choose_plan

DEFAULT_PREFETCH_DEPTH = 1  # OffloadConfig's default: a config that keeps it lets the planner choose


@dataclass(frozen=True)
class PlanReport:
    """What `fuyou plan` prints: the inputs' names, the caps, and the prediction (None when infeasible)."""

    model_name: str
    model: TransformerConfig
    hardware: HardwareProfile
    caps: Caps
    prediction: Prediction | None
    error: str | None = None
    # The same plan's step when the previous step clipped: updates wait for the norm (cost_model docstring);
    # None when nothing clips (train.max_grad_norm null).
    after_clip: Prediction | None = None

    @property
    def feasible(self) -> bool:
        return self.prediction is not None


def resolve_model(config: TrainConfig) -> tuple[str, TransformerConfig]:
    """The model's name and shape from the config, without allocating it."""
    model = config.model
    return (model.path or model.preset), resolve_config(**vars(model))


def plan_config(config: TrainConfig, hardware: HardwareProfile, *, search_batch: bool = False,
                swap_internals: bool = False) -> PlanReport:
    """Plans the config's job: its step batch (train.batch_size x train.grad_accum), sequence length,
    caps and any placement it fixes (offload.params/optimizer/activations/optimizer_cpu_blocks;
    prefetch_depth when not 1), with the gradient ring where the runtime would use one
    (offload.gradient_ring, one micro-batch a step and train.max_grad_norm null)."""
    name, model = resolve_model(config)
    offload, train = config.offload, config.train
    precision = train.precision if train.precision != "auto" else ("bf16" if hardware.compute_device == "cuda" else "fp32")
    caps = Caps.of(hardware, offload.gpu_memory_gb, offload.cpu_memory_gb)
    clipping = train.max_grad_norm is not None
    try:
        prediction = choose_plan(
            model, hardware,
            batch_size=train.batch_size * train.grad_accum,
            seq_len=train.seq_len,
            gpu_memory_gb=offload.gpu_memory_gb,
            cpu_memory_gb=offload.cpu_memory_gb,
            params=offload.params,
            optimizer=offload.optimizer,
            activations=offload.activations,
            prefetch_depth=None if offload.prefetch_depth == DEFAULT_PREFETCH_DEPTH else offload.prefetch_depth,
            optimizer_cpu_blocks=offload.optimizer_cpu_blocks,
            outer_optimizer=offload.outer_optimizer,
            precision=precision,
            swap_internals=swap_internals,
            search_batch=search_batch,
            gradient_ring=offload.gradient_ring,
            clipping=clipping,
        )
    except PlanError as error:
        return PlanReport(name, model, hardware, caps, None, str(error))
    after_clip = None
    if clipping:
        ring = gradient_ring_buffers(offload.gradient_ring, prediction.plan.grad_accum, clipping)
        after_clip = predict(model, prediction.plan, hardware, deferred_updates=True, gradient_ring=ring)
    return PlanReport(name, model, hardware, caps, prediction, after_clip=after_clip)


def to_json(report: PlanReport) -> dict:
    """One flat object: feasible, iteration_s, tflops (6N model TFLOPS), the breakdown, the plan."""
    out = {"feasible": report.feasible, "model": report.model_name, "hardware": report.hardware.name}
    if not report.feasible:
        return out | {"error": report.error, "iteration_s": None, "tflops": None}
    p = report.prediction
    return out | {
        "iteration_s": p.iteration_s,
        "iteration_s_after_clip": report.after_clip.iteration_s if report.after_clip else None,
        "tflops": p.tflops,
        "hardware_tflops": p.hardware_tflops,
        "megatron_tflops": p.megatron_tflops,
        "tokens_per_s": p.tokens_per_s,
        "step_tokens": p.step_tokens,
        "phases_s": {"prologue": p.prologue_s, "forward": p.forward_s, "head": p.head_s,
                     "backward": p.backward_s, "epilogue": p.epilogue_s},
        "busy_s": {"compute": p.compute_busy_s, "pcie": p.pcie_busy_s, "ssd": p.ssd_busy_s, "optimizer": p.optimizer_busy_s},
        "bottleneck": {"forward": p.forward_bottleneck, "backward": p.backward_bottleneck},
        "peak_gib": {"gpu": p.gpu_peak_bytes / GiB, "cpu": p.cpu_peak_bytes / GiB, "ssd": p.ssd_bytes / GiB},
        "caps_gib": {"gpu": report.caps.gpu_bytes / GiB, "cpu": report.caps.cpu_bytes / GiB,
                     "ssd": None if report.caps.ssd_bytes is None else report.caps.ssd_bytes / GiB},
        "traffic_gb": {"pcie": p.pcie_bytes / 1e9, "ssd": p.ssd_traffic_bytes / 1e9},
        "plan": {**vars(p.plan), "batch_size": p.plan.batch_size},
        "overrides": p.plan.config_overrides(),
    }


def to_text(report: PlanReport) -> str:
    head = (f"plan for {report.model_name} ({report.model.num_parameters() / 1e9:.2f}B parameters) on "
            f"{report.hardware.name} [{report.hardware.source}]")
    if not report.feasible:
        return f"{head}\n  {report.error}"
    p, plan, caps = report.prediction, report.prediction.plan, report.caps
    ssd_cap = "unchecked" if caps.ssd_bytes is None else f"{caps.ssd_bytes / GiB:.0f} GiB"
    lines = [
        head,
        f"  placement   {plan.describe()}",
        f"  step        {plan.batch_size} sequences x {plan.seq_len} tokens = {p.step_tokens} tokens "
        f"({plan.micro_batch_size} per pass x {plan.grad_accum} accumulated), {plan.precision}",
        f"  run it      fuyou train --config ... {' '.join(plan.config_overrides())}",
        "predicted step",
        f"  iteration   {p.iteration_s:.3f} s = prologue {p.prologue_s:.3f} + forward {p.forward_s:.3f} + head {p.head_s:.3f}"
        f" + backward {p.backward_s:.3f} + epilogue {p.epilogue_s:.3f}",
        *([f"  after clip  {report.after_clip.iteration_s:.3f} s when the previous step clipped (its updates wait for "
           "the gradient norm and overlap this forward, not the last backward)"] if report.after_clip else []),
        f"  busy        compute {p.compute_busy_s:.3f} s, PCIe {p.pcie_busy_s:.3f} s ({p.pcie_bytes / 1e9:.1f} GB), "
        f"SSD {p.ssd_busy_s:.3f} s ({p.ssd_traffic_bytes / 1e9:.1f} GB), CPU optimizer {p.optimizer_busy_s:.3f} s",
        f"  bottleneck  forward: {p.forward_bottleneck}, backward: {p.backward_bottleneck}",
        f"  throughput  {p.tokens_per_s:.0f} tokens/s; TFLOPS: model (6N) {p.tflops:.1f}, "
        f"hardware (with recompute) {p.hardware_tflops:.1f}, Megatron formula {p.megatron_tflops:.1f}",
        f"  peak memory GPU {p.gpu_peak_bytes / GiB:.1f} of {caps.gpu_bytes / GiB:.1f} GiB, "
        f"CPU {p.cpu_peak_bytes / GiB:.1f} of {caps.cpu_bytes / GiB:.1f} GiB, SSD {p.ssd_bytes / GiB:.1f} GiB of {ssd_cap}",
    ]
    return "\n".join(lines)
