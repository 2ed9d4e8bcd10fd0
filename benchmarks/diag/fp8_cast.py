"""How fast `quant.fp8_cast`'s kernel writes both FP8 layouts, per tile shape, against a bf16 pass (issue 7).

    python -m benchmarks.diag.fp8_cast [--tokens 16384] [--widths 2048 8192] [--samples 7] [--repeat 10]
                                       [--prologues none gelu gelu_backward] [--weights 6144x2048 8192x2048 ...]

For each [tokens, width] bf16 tensor and each prologue (none; gelu; gelu_backward with the bias sum) it
times the kernel at a few (BLOCK_R, BLOCK_C, warps) choices, and, as the yardstick, the bf16 pass that
moves the same bytes in the bf16 step: a copy for "none" (2 B in, 2 B out), Inductor's compiled GELU for
"gelu" and GELU's backward for "gelu_backward" (4 B in, 2 B out). The kernel moves the same bytes (its two
FP8 layouts are 2 B an element), so the ratio says what the cast costs over what bf16 pays anyway.
Times are CUDA-event medians of `--samples` samples of `--repeat` back-to-back calls; GB/s counts those bytes.
`--weights OxI ...` also times prologue "none" on fp32 tensors of those shapes, as HALO casts its fp32 master
weights (4 B in, 2 B out; the yardstick is a bf16 cast of the weight, 4 B in, 2 B out).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.diag.fp8_layouts import time_ms

CONFIGS = [(64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 4), (128, 128, 4), (128, 128, 8), (32, 256, 8),
           (256, 64, 8), (64, 256, 8)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--widths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--prologues", nargs="+", default=["none", "gelu", "gelu_backward"])
    parser.add_argument("--weights", nargs="*", default=[], help="fp32 OxI shapes, e.g. 6144x2048")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from quant import fp8_cast

    gelu = torch.compile(lambda u: torch.nn.functional.gelu(u, approximate="tanh"))
    gelu_backward = torch.compile(lambda d, u: torch.ops.aten.gelu_backward(d, u, approximate="tanh"))
    print(f"{'shape':>13} | {'prologue':>13} | {'bf16 pass ms':>12} | best tile (R, C, warps) | kernel ms | "
          "GB/s | vs bf16 | every tile ms")
    def report(shape, prologue, bf16_ms, tiles, gb):
        best = min(tiles, key=tiles.get)
        print(f"{str(shape):>13} | {prologue:>13} | {bf16_ms:12.3f} | {str(best):>23} | {tiles[best]:9.3f} | "
              f"{gb / tiles[best] * 1e3:4.0f} | {bf16_ms / tiles[best]:6.2f}x | "
              + " ".join(f"{tile}:{ms:.3f}" for tile, ms in tiles.items()), flush=True)

    state = torch.zeros(17, 4, device="cuda")
    state[0] = 4.0
    for shape in (tuple(int(size) for size in text.split("x")) for text in args.weights):
        w = torch.randn(shape, device="cuda", dtype=torch.float32)
        bf16_ms = time_ms(lambda: w.to(torch.bfloat16), (), args.repeat, args.samples)
        tiles = {tile: time_ms(lambda tile=tile: fp8_cast.cast_eager(w, state, 1, rows=True, cols=True, block_r=tile[0],
                                                                     block_c=tile[1], num_warps=tile[2]),
                               (), args.repeat, args.samples) for tile in CONFIGS}
        report(shape, "none fp32", bf16_ms, tiles, 6 * w.numel() / 1e9)
    for width in args.widths:
        shape = (args.tokens, width)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        saved = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(width, device="cuda", dtype=torch.float32)
        for prologue, baseline, bytes_per in (("none", lambda: x.clone(), 4),
                                              ("gelu", lambda: gelu(x), 4),
                                              ("gelu_backward", lambda: gelu_backward(x, saved), 6)):
            if prologue not in args.prologues:
                continue
            bf16_ms = time_ms(baseline, (), args.repeat, args.samples)
            extra = {"none": {}, "gelu": {"bias": bias},
                     "gelu_backward": {"bias": bias, "saved": saved, "colsum": True}}[prologue]
            tiles = {}
            for block_r, block_c, warps in CONFIGS:
                tiles[(block_r, block_c, warps)] = time_ms(
                    lambda: fp8_cast.cast_eager(x, state, 0, rows=True, cols=True, prologue=prologue, block_r=block_r,
                                                block_c=block_c, num_warps=warps, **extra),
                    (), args.repeat, args.samples)
            report(shape, prologue, bf16_ms, tiles, bytes_per * x.numel() / 1e9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
