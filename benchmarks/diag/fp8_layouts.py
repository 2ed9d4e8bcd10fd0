"""What writing FP8 operands in both layouts costs, kernel by kernel, and what could make it cheaper (issue 7).

    python -m benchmarks.diag.fp8_layouts [--tokens 16384] [--widths 2048 8192] [--repeat 10]

HALO's weight gradient reduces over tokens, and Hopper's FP8 GEMM takes only K-contiguous operands, so each
quantized activation and output gradient is written twice: row-major for one GEMM, transposed for the weight
gradient. The tenth session's profile put about 29 ms of a 1.3B batch-8 step into those transposed writes,
fused by Inductor into the producer kernels. This script times one producer, GELU's backward (the up_proj
output gradient), on a [tokens, width] tensor, in the ways the quantizer could be built:

- `bf16`: the producer alone, bf16 out (what the bf16 step runs).
- `fp8 both, current`: amax, scale, cast, both layouts (what HALO runs now under `train.compile`).
- `fp8 both, given scale`: the scale comes in (delayed scaling), both layouts from the producer.
- `fp8 rows, given scale`: the producer writes the row-major FP8 only.
- `fp8 transpose (...)`: the transposed copy made afterwards from the row-major FP8 bytes, by Inductor or
  by a Triton kernel that also takes the amax of the bytes it moves (what delayed scaling records).
  Its tiles are set by hand, since the point is whether a tile shape exists that reaches the bandwidth.

Each Inductor variant also runs with a few Inductor tiling options. Times are CUDA-event medians of
`--samples` samples of `--repeat` back-to-back calls; GB/s counts the bytes each variant must move.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

INDUCTOR_OPTIONS = {
    "default": {},
    "nd-tiling": {"triton.prefer_nd_tiling": True},
    "block-ptr": {"triton.use_block_ptr": True},
    "tensor-desc": {"triton.use_tensor_descriptor": True},
}


def gelu_bwd(g, a):
    return torch.ops.aten.gelu_backward(g, a, approximate="tanh")


def both_current(g, a):
    dy = gelu_bwd(g, a)
    amax = torch.linalg.vector_norm(dy, float("inf")).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (dy.float() * scale.reciprocal()).to(FP8)
    return q, q.t().contiguous(), scale


def both_given(g, a, scale):
    q = (gelu_bwd(g, a).float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, q.t().contiguous()


def rows_given(g, a, scale):
    return (gelu_bwd(g, a).float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def transpose(q):
    return q.t().contiguous()


def triton_transpose(block_r: int, block_c: int, warps: int, explicit: bool):
    """A [R, C] FP8 tensor's [C, R] copy and the largest magnitude byte, by a Triton kernel with set tiles."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, amax_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EXPLICIT: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r[:, None] < R) & (c[None, :] < C)
        x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0)
        if EXPLICIT:
            tl.store(y_ptr + c[:, None] * R + r[None, :], tl.trans(x), mask=tl.trans(mask))
        else:
            tl.store(y_ptr + c[None, :] * R + r[:, None], x, mask=mask)
        # e4m3fn bytes without the sign bit order like magnitudes (0x7E = 448; 0x7F, NaN, is never written).
        tl.atomic_max(amax_ptr, tl.max(tl.max(x & 0x7F, axis=1), axis=0).to(tl.int32))

    def run(q):
        rows, cols = q.shape
        out = torch.empty(cols, rows, dtype=torch.uint8, device=q.device)
        amax = torch.zeros(1, dtype=torch.int32, device=q.device)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        kernel[grid](q.view(torch.uint8), out, amax, rows, cols, BLOCK_R=block_r, BLOCK_C=block_c,
                     EXPLICIT=explicit, num_warps=warps)
        return out.view(FP8), amax

    return run


def time_ms(fn, args, repeat: int, samples: int) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--widths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for width in args.widths:
        n = args.tokens * width
        g = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(args.tokens, width, device="cuda", dtype=torch.bfloat16)
        scale = (torch.linalg.vector_norm(gelu_bwd(g, a).float(), float("inf")) / FP8_MAX).reshape(())
        q = rows_given(g, a, scale)

        def add(name, fn, fn_args, bytes_per_element):
            ms = time_ms(fn, fn_args, args.repeat, args.samples)
            rows.append((width, name, ms, bytes_per_element * n / ms / 1e6))
            print(f"{width:6d}  {name:44s} {ms:8.4f} ms  {rows[-1][3]:7.0f} GB/s", flush=True)

        add("bf16 copy", torch.clone, (g,), 4)
        for option, opts in INDUCTOR_OPTIONS.items():
            try:
                add(f"bf16 [{option}]", torch.compile(gelu_bwd, options=opts), (g, a), 6)
                add(f"fp8 both, current [{option}]", torch.compile(both_current, options=opts), (g, a), 6)
                add(f"fp8 both, given scale [{option}]", torch.compile(both_given, options=opts), (g, a, scale), 6)
                add(f"fp8 rows, given scale [{option}]", torch.compile(rows_given, options=opts), (g, a, scale), 5)
                add(f"fp8 transpose, Inductor [{option}]", torch.compile(transpose, options=opts), (q,), 2)
            except Exception as error:  # noqa: BLE001 - an option this torch lacks: say so, go on
                print(f"{width:6d}  [{option}] failed: {error!r:.200}", flush=True)
            torch._dynamo.reset()
        expected = q.t().contiguous().view(torch.uint8)
        for block_r, block_c, warps in [(64, 64, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (256, 64, 4),
                                        (128, 256, 8), (256, 128, 8)]:
            for explicit in (False, True):
                run = triton_transpose(block_r, block_c, warps, explicit)
                out, amax = run(q)
                ok = torch.equal(out.view(torch.uint8), expected) and int(amax) == int((q.view(torch.uint8) & 0x7F).max())
                add(f"fp8 transpose, Triton {block_r}x{block_c} w{warps}{' trans' if explicit else ''}{'' if ok else ' WRONG'}",
                    run, (q,), 2)
    print("\nwidth | variant | ms per call | GB/s")
    for width, name, ms, gbs in rows:
        print(f"{width} | {name} | {ms:.4f} | {gbs:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
