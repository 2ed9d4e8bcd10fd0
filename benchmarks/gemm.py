"""Measures the GPU's dense matrix-multiply rate, the ceiling model TFLOPS is compared against.

    python -m benchmarks.gemm [--size 8192] [--dtype bf16]

Times `size`^3 products on random data (zeros run faster and would flatter the peak) with CUDA
events after a warm-up, and prints the median TFLOPS over the repeats.
"""

import argparse
import statistics

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gemm_tflops(size: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times_ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return 2 * size**3 / (statistics.median(times_ms) / 1e3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    print(f"{args.dtype} GEMM {args.size}^3: {gemm_tflops(args.size, DTYPES[args.dtype]):.0f} TFLOPS ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
