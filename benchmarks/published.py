"""Check 2 of issue 5: the cost model against Fuyou's published RTX 4090 results for GPT-3 13B, 12 SSDs.

    python -m benchmarks.published > benchmarks/fuyou_published.md

Prints Markdown: the prediction from the datasheet profile (configs/hardware/rtx4090-12ssd.yaml) next to
the published TFLOPS, then what-if rows that explain the gap. No constant here is fitted to the five
published numbers; the what-ifs change one input each and say where its value comes from.
Runs on the CPU in about a second (the cost model allocates nothing).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from fuyou.models import get_preset
from fuyou.plan import HardwareProfile
from fuyou.plan.cost_model import Prediction, megatron_flops
from fuyou.plan.planner import choose_plan

ROOT = Path(__file__).parent.parent
PROFILE = ROOT / "configs" / "hardware" / "rtx4090-12ssd.yaml"
MODEL = "gpt3-13b"
SEQ_LEN = 1024
GPU_CAP_GB = 24


@dataclass(frozen=True)
class Case:
    batch_size: int
    published_tflops: float
    description: str = ""


# Fuyou paper (arXiv 2403.06504v1), GPT-3 13B on the RTX 4090 testbed with 12 SSDs, as quoted in issue 5.
CASES = [
    Case(8, 42.8, "I/O-bound end"),
    Case(16, 84.3),
    Case(32, 143.1),
    Case(64, 155.8, "the paper's headline number"),
    Case(128, 153.8),
]


@dataclass(frozen=True)
class Variant:
    name: str
    why: str
    hardware_changes: dict
    planner_options: dict


# As Fuyou runs: checkpointed blocks recompute whole (as the Megatron count of its TFLOPS, c = 4, assumes;
# our runtime skips each block's last GEMM, Fuyou's is not known to), and optimizer state that is on the SSDs
# is all there (the planner would otherwise keep 39 of 40 blocks' state in the testbed's 768 GB of RAM).
FUYOU = {"recompute_last_linear": True, "split_optimizer": False}
FUYOU_PLACEMENT = FUYOU | {"params": "ssd", "optimizer": "ssd"}  # weights and optimizer state on the SSDs
VARIANTS = [
    Variant("datasheet profile", "the prediction: every rate from a datasheet", {}, FUYOU_PLACEMENT),
    Variant("SSD array 20 / 18 GB/s", "what-if: read/write rates the released LoHan code hard-codes (issue 5 quotes "
            "'18 and 20 GB/s'; which is read and which write is our guess)",
            {"ssd_read_gbps": 20 / 12, "ssd_write_gbps": 18 / 12}, FUYOU_PLACEMENT),
    Variant("weights in RAM", "what-if: bf16 weights streamed from RAM, only optimizer state on SSD", {},
            FUYOU | {"params": "cpu", "optimizer": "ssd"}),
    Variant("Fuyou internals swapping", "what-if: block internals swapped instead of recomputed (paper section 4.4)",
            {}, FUYOU_PLACEMENT | {"swap_internals": True}),
]


def predict_case(case: Case, hardware: HardwareProfile, options: dict, seq_len: int = SEQ_LEN) -> Prediction:
    return choose_plan(get_preset(MODEL), hardware, batch_size=case.batch_size, seq_len=seq_len,
                       gpu_memory_gb=GPU_CAP_GB, **options)


def error(predicted: float, published: float) -> str:
    return f"{100 * (predicted / published - 1):+.0f}%"


def main() -> None:
    hardware = HardwareProfile.from_yaml(PROFILE)
    model = get_preset(MODEL)
    out = print
    out("# Cost model vs Fuyou's published RTX 4090 results (GPT-3 13B, 12 SSDs)\n")
    out(f"Generated {datetime.date.today().isoformat()} on the CPU by `python -m benchmarks.published > "
        "benchmarks/fuyou_published.md` (issue 5, check 2). Profile: `configs/hardware/rtx4090-12ssd.yaml`, "
        "every field a datasheet figure with its source beside it; nothing was fitted to the numbers below.\n")
    out("## Setup\n")
    out(f"- Model: `{MODEL}` preset (40 blocks, hidden 5120, 40 heads, vocab 50257, "
        f"{model.num_parameters() / 1e9:.2f}B parameters), sequence length {SEQ_LEN}, bf16, GPU cap {GPU_CAP_GB} GiB.")
    out("- Placement as Fuyou runs it: weights and optimizer state on the SSDs (`params=ssd optimizer=ssd`); the planner "
        "chooses activations, micro-batch (the rest is gradient accumulation when one pass would not fit 24 GiB) and "
        "prefetch depth.")
    out("- TFLOPS convention: Megatron's `24·c·B·S·L·D²·(1 + S/6D + V/16LD)`, c = 4 (activation checkpointing), the "
        "formula DeepSpeed/Megatron scripts print. For a checkpointed GPT it equals the FLOPs the GPU executes "
        "(`hardware_flops` in the cost model, checked in tests); why not 6·N·tokens: see the last section. The 6N "
        "prediction is in its own column.")
    out("- Sequence length and FLOP formula could not be read from the authors' scripts: the RC4ML/LoHan repository is "
        "not in the code index available here (`find_repos`, `find_files`, `read_file` return nothing for it). "
        "1024 is this repository's `configs/gpt3-13b.yaml` and the usual setting of the DeepSpeed GPT examples; see the "
        "sequence-length table for how much hangs on it.\n")

    base = VARIANTS[0]
    predictions = [predict_case(case, hardware.replace(**base.hardware_changes), base.planner_options) for case in CASES]
    out("## Prediction (datasheet profile) vs published\n")
    out("| batch | published TFLOPS | predicted TFLOPS | error | predicted 6N TFLOPS | predicted iteration s | published "
        "iteration s | backward bottleneck | plan |")
    out("|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for case, p in zip(CASES, predictions):
        published_iteration_s = megatron_flops(model, case.batch_size, SEQ_LEN) / (case.published_tflops * 1e12)
        plan = p.plan
        out(f"| {case.batch_size} | {case.published_tflops} | {p.megatron_tflops:.1f} | "
            f"{error(p.megatron_tflops, case.published_tflops)} | {p.tflops:.1f} | {p.iteration_s:.1f} | "
            f"{published_iteration_s:.1f} | {p.backward_bottleneck} | activations {plan.activations}, "
            f"micro-batch {plan.micro_batch_size} x {plan.grad_accum} |")

    out("\n## What-if rows (one input changed each; not predictions)\n")
    out("| batch | published | " + " | ".join(v.name for v in VARIANTS[1:]) + " |")
    out("|---:|---:|" + "---:|" * (len(VARIANTS) - 1))
    ssd_what_if_errors = []
    for case in CASES:
        cells = []
        for variant in VARIANTS[1:]:
            p = predict_case(case, hardware.replace(**variant.hardware_changes), variant.planner_options)
            cells.append(f"{p.megatron_tflops:.1f} ({error(p.megatron_tflops, case.published_tflops)})")
            if variant is VARIANTS[1]:
                ssd_what_if_errors.append(abs(p.megatron_tflops / case.published_tflops - 1))
        out(f"| {case.batch_size} | {case.published_tflops} | " + " | ".join(cells) + " |")
    out("")
    for variant in VARIANTS[1:]:
        out(f"- **{variant.name}**: {variant.why}.")

    out("\n## Sequence length (datasheet profile)\n")
    out("| batch | published | S = 512 | S = 1024 | S = 2048 |")
    out("|---:|---:|---:|---:|---:|")
    short_errors = []
    for case in CASES:
        cells = []
        for seq_len in (512, 1024, 2048):
            p = predict_case(case, hardware, FUYOU_PLACEMENT, seq_len=seq_len)
            cells.append(f"{p.megatron_tflops:.1f}")
            if seq_len == 512:
                short_errors.append(p.megatron_tflops / case.published_tflops - 1)
        out(f"| {case.batch_size} | {case.published_tflops} | " + " | ".join(cells) + " |")
    out(f"\nThe I/O-bound end hangs on S: a step's fixed optimizer leg is amortised over B x S tokens. With S = 512 "
        f"the datasheet prediction would be off by {', '.join(f'{e:+.0%}' for e in short_errors)}; the authors' S "
        "could not be checked (see Setup), so the table above keeps 1024.")

    # diagnostics from the published numbers (read off, not fed back into any prediction)
    errors = [p.megatron_tflops / case.published_tflops - 1 for case, p in zip(CASES, predictions)]
    compute_bound = [(case, p, e) for case, p, e in zip(CASES, predictions, errors) if p.backward_bottleneck == "compute"
                     and case.batch_size >= 32]
    p8, case8 = predictions[0], CASES[0]
    published_8_s = megatron_flops(model, 8, SEQ_LEN) / (case8.published_tflops * 1e12)
    # the step minus the parts that do not wait on the SSD: what the SSD leg must have taken
    implied_ssd_gbps = p8.ssd_traffic_bytes / (published_8_s - p8.prologue_s - p8.forward_s - p8.head_s) / 1e9
    datasheet_ssd_gbps = p8.ssd_traffic_bytes / p8.ssd_busy_s / 1e9
    checkpointed = megatron_flops(model, 64, SEQ_LEN, checkpointing=True) / (6 * model.num_parameters() * 64 * SEQ_LEN)
    plain = megatron_flops(model, 64, SEQ_LEN, checkpointing=False) / (6 * model.num_parameters() * 64 * SEQ_LEN)
    out("\n## Reading the gap\n")
    out(f"- **Batch {min(c.batch_size for c, _, _ in compute_bound)}-{max(c.batch_size for c, _, _ in compute_bound)} "
        f"(compute-bound): {min(e for *_, e in compute_bound):+.0%} to {max(e for *_, e in compute_bound):+.0%}.** "
        "The prediction there is the 4090's datasheet peak (165.2 TFLOPS) running every executed FLOP; the published "
        "numbers sit below it by what non-GEMM kernels, launch gaps and clocks under the boost clock cost, which the "
        "cost model leaves out (the first two items of its docstring's list). Within the issue's +-15% goal.")
    out(f"- **Batch 8 and 16 (I/O-bound): {errors[0]:+.0%} and {errors[1]:+.0%}, far outside the goal.** Published, "
        f"one iteration takes {published_8_s:.1f} s at batch 8 and about as long at batch 16: a fixed cost per step "
        "that does not grow with the batch, i.e. the optimizer leg: CPU AdamW over 12.85B parameters and "
        f"{p8.ssd_traffic_bytes / 1e9:.0f} GB of SSD traffic (12 B/param of state read and written, bf16 weights read "
        f"for forward and backward and written once). From the datasheets (12 drives: 78 GB/s read, 40.8 GB/s write, "
        f"{datasheet_ssd_gbps:.0f} GB/s for this read/write mix) that leg is {p8.ssd_busy_s:.1f} s of SSD time and "
        f"{p8.optimizer_busy_s:.1f} s of AdamW (DDR4 bandwidth bound), so the model predicts a {p8.iteration_s:.1f} s "
        f"step. To fill {published_8_s:.1f} s, the array must have delivered about {implied_ssd_gbps:.0f} GB/s for this "
        f"mix, {implied_ssd_gbps / datasheet_ssd_gbps:.0%} of its datasheet rate. The what-if with the 18/20 GB/s the "
        f"authors' code assumes lands within {max(ssd_what_if_errors):.0%} at every batch. So the error is in an input, "
        "not the structure: datasheet sequential rates are not what 12 drives in RAID-0 give through one filesystem with "
        "reads and writes mixed (and the optimizer, PCIe DMA and SSD DMA sharing DRAM); a `fuyou probe --ssd-dir` on "
        "that machine would supply the real rate.")
    out(f"- Counting convention: per 6N FLOP a checkpointed step executes {checkpointed:.2f} FLOPs and a step without "
        f"recompute {plain:.2f}; so 155.8 '6N TFLOPS' would be {155.8 * plain / 165.2:.0%} of the 4090's peak without "
        f"any recompute and {155.8 * checkpointed / 165.2:.0%} with it. Counting the recompute (Megatron's formula, "
        "equal to the executed FLOPs here) is the only reading under which a checkpointed run reaches 155.8.")
    out("- Internals swapping (Fuyou's finer policy) predicts more than the published TFLOPS at large batch: with the "
        "recompute gone the GPU executes 25% fewer FLOPs than the Megatron formula credits. That the published "
        "numbers stay under the 165.2 peak suggests the published runs recomputed most blocks at those batches.")
    out("- The memory model fits micro-batches of up to 64 sequences (x 1024 tokens) in 24 GiB (one block's recompute "
        "working set plus the head's 4096-token chunk of logits), so batch 128 is predicted with gradient "
        "accumulation (2 x 64); Fuyou may have run it in one pass with a leaner working set. Accumulation changes "
        "little here (the optimizer leg is hidden behind compute at that batch).")
    out("\n## Sources\n")
    out("- Published TFLOPS: Fuyou paper, Liao et al., arXiv 2403.06504v1, GPT-3 13B end-to-end throughput on the "
        "RTX 4090 with 12 SSDs (numbers as quoted in issue 5 and /work/shared/HARDWARE.md).")
    out("- Hardware figures: `configs/hardware/rtx4090-12ssd.yaml` (NVIDIA Ada whitepaper; PCIe 4.0 spec arithmetic; "
        "Intel ark Xeon Gold 5320; Intel D7-P5510 product brief), each beside its field.")
    out("- FLOP formula: Narayanan et al., 'Efficient Large-Scale Language Model Training on GPU Clusters Using "
        "Megatron-LM', SC21, appendix (the c = 4 form with activation recomputation).")
    out("- Cost model: `fuyou/plan/cost_model.py` (its docstring lists what it does not model).")


if __name__ == "__main__":
    main()
