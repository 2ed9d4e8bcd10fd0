"""One transformer block (GPT-3 2.7B by default), eager against `train.compile`: TFLOPS and fraction of the bf16 GEMM rate.

    python -m benchmarks.compile_block [--preset gpt3-2.7b] [--seq-len 2048] [--batch 8 --batch 32]
                                       [--compiled-only] [--halo] [--json PATH]

The block runs as runtime=fuyou runs it (fuyou.schedule): bf16 autocast on an fp32 residual stream,
its weights two flat parts (bf16 matrices, fp32 norms and biases) sliced into views, called through
`functional_call` (eager) or through `fuyou.block_compile.flat_block_function` (compiled). Rows:
    forward       without grad, as the runtime's forward and input recompute run it (1 x forward FLOPs)
    fwd+bwd       forward with grad, then the gradients of x and both parts (3 x forward FLOPs), as
                  `fuyou probe`'s block_efficiency measures it (which uses an fp32 nn.Module: the
                  `probe-eager` row reproduces that)
Forward FLOPs are fuyou.plan.cost_model.block_forward_flops (matmuls and attention's quadratic term).
Times are the median of `--repeats` calls timed with CUDA events after warm-up calls (the first
compiled call's seconds, the compile, are reported apart); the GEMM rate is a bf16 8192^3 product
measured the same way in the same process (benchmarks.gemm). `--halo` adds HALO level 0 (FP8 block
linears) eager and compiled.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time

import torch
from torch.func import functional_call

from benchmarks.gemm import gemm_tflops
from fuyou.block_compile import flat_block_function
from fuyou.models import get_preset
from fuyou.models.transformer import Block
from fuyou.plan.cost_model import block_forward_flops
from fuyou.runtime import model_layouts



def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms)


class RuntimeBlock:
    """Block 0 of a one-block model as the runtime streams it: flat parts on the GPU, a template on "meta"."""

    def __init__(self, block: Block, compiled: bool):
        holder = torch.nn.Module()
        holder.blocks = torch.nn.ModuleList([block])
        layouts = model_layouts(holder)[0][0]
        named = dict(block.named_parameters())
        self.parts = [layout.flatten([named[n] for n in layout.names], dtype).cuda()
                      for layout, dtype in zip(layouts, (torch.bfloat16, torch.float32))]
        template = copy.deepcopy(block).to("meta")
        self.layouts = layouts
        self.run = flat_block_function(template, layouts) if compiled else self._eager(template)

    def _eager(self, template):
        def run(x_BSD, *parts):
            views = {}
            for layout, part in zip(self.layouts, parts):
                views.update(layout.views(part))
            return functional_call(template, views, (x_BSD,))
        return run

    def forward(self, x_BSD):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return self.run(x_BSD, *self.parts)

    def forward_backward(self, x_BSD, grad_BSD):
        x_leaf = x_BSD.detach().requires_grad_()
        leaves = [part.detach().requires_grad_() for part in self.parts]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_BSD = self.run(x_leaf, *leaves)
        return torch.autograd.grad(y_BSD, [x_leaf, *leaves], grad_BSD)


def measure(name: str, block: Block, batch: int, seq_len: int, repeats: int, flops_forward: float, compiled: bool,
            probe_style: bool = False) -> list[dict]:
    x_BSD = torch.randn(batch, seq_len, block.attn_norm.weight.shape[0], device="cuda")
    grad_BSD = torch.randn_like(x_BSD)
    rows = []
    if probe_style:  # fuyou probe's block_efficiency: fp32 module, autocast casts the weights each call
        module = copy.deepcopy(block).cuda()

        def forward():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return module(x_BSD)

        def forward_backward():
            x_leaf = x_BSD.detach().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y_BSD = module(x_leaf)
            return torch.autograd.grad(y_BSD, [x_leaf, *module.parameters()], grad_BSD)
    else:
        runtime_block = RuntimeBlock(block, compiled)

        def forward():
            return runtime_block.forward(x_BSD)

        def forward_backward():
            return runtime_block.forward_backward(x_BSD, grad_BSD)
    for what, fn, flops in (("forward", forward, flops_forward), ("fwd+bwd", forward_backward, 3 * flops_forward)):
        start_s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start_s  # the compile, for a compiled block
        ms = median_ms(fn, repeats)
        rows.append(dict(variant=name, batch=batch, seq_len=seq_len, what=what, ms=ms, tflops=flops / (ms / 1e3) / 1e12, first_call_s=first_s))
        print(f"{name:16s} b{batch:<3d} {what:8s} {ms:8.2f} ms  {rows[-1]['tflops']:6.1f} TFLOPS  (first call {first_s:.1f} s)", flush=True)
    torch.cuda.empty_cache()  # the variant's tensors go with this frame; its cached blocks go now
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt3-2.7b", help="model preset whose block is timed (default gpt3-2.7b)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, action="append", default=[], help="micro-batch sizes (default 8 and 32)")
    parser.add_argument("--compiled-only", action="store_true", help="only the compiled block (no eager rows)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--halo", action="store_true", help="also HALO level 0, eager and compiled (smallest batch)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    batches = args.batch or [8, 32]
    config = get_preset(args.preset)
    torch.manual_seed(0)
    block = Block(config)  # fp32 on the CPU; each variant takes its own copy in its own layout
    peak = gemm_tflops(8192)
    print(f"bf16 GEMM 8192^3: {peak:.1f} TFLOPS ({torch.cuda.get_device_name()}, torch {torch.__version__})", flush=True)
    rows = []
    for batch in batches:
        flops_forward = block_forward_flops(config, batch, args.seq_len).forward
        if not args.compiled_only:
            if batch == min(batches):
                rows += measure("probe-eager", block, batch, args.seq_len, args.repeats, flops_forward, compiled=False, probe_style=True)
            rows += measure("eager", block, batch, args.seq_len, args.repeats, flops_forward, compiled=False)
        rows += measure("compiled", block, batch, args.seq_len, args.repeats, flops_forward, compiled=True)
    if args.halo:
        from quant.halo import apply_halo

        halo_block = copy.deepcopy(block)
        apply_halo(halo_block, level=0)
        batch = min(batches)
        flops_forward = block_forward_flops(config, batch, args.seq_len).forward
        rows += measure("halo0-eager", halo_block, batch, args.seq_len, args.repeats, flops_forward, compiled=False)
        rows += measure("halo0-compiled", halo_block, batch, args.seq_len, args.repeats, flops_forward, compiled=True)
    for row in rows:
        row["fraction_of_gemm"] = row["tflops"] / peak
    print(f"\n{args.preset} block, sequence {args.seq_len}")
    print(f"| variant | batch x {args.seq_len} | pass | ms | TFLOPS | / GEMM {peak:.0f} | first call s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['batch']} | {row['what']} | {row['ms']:.2f} | {row['tflops']:.1f} | "
              f"{row['fraction_of_gemm']:.2f} | {row['first_call_s']:.1f} |")
    if args.json:
        result = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                      commit=os.environ.get("FUYOU_COMMIT", "unknown"), gemm_tflops=peak, preset=args.preset,
                      seq_len=args.seq_len, rows=rows)
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
