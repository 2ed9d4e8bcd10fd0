"""Which SDPA backend runs our causal attention fastest on this GPU, and do they agree?
Issues 4 and 7: attention is outside 6·N·tokens (it only costs time), and on the H100 it was 15 ms of a
161 ms GPT-3 1.3B step at batch 4 (`benchmarks.diag.halo_step`), more at the 2.7B shape's head size 80.

    PYTHONPATH=. python -m benchmarks.diag.attention [--shapes 4x16x2048x128 32x32x2048x80] [--repeats 20]

Each shape is batch x heads x seq x head_dim, bf16, causal, as `fuyou.models.transformer.Attention` calls
`F.scaled_dot_product_attention`. For every backend torch offers here (`torch.nn.attention.SDPBackend`):
forward alone and forward + backward, median of CUDA-event-timed calls after warm-ups, the TFLOPS that
means (causal FLOPs: forward 2·B·H·S²·E, backward 2.5× that), and the largest difference of its output and
input gradients from the default's. Also times the same under `torch.compile(fullgraph=True)` with
the backend chosen by `sdpa_kernel`, to show the choice survives compilation. Prints a table last.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.compile_block import median_ms

BACKENDS = {
    "default": None,  # whatever torch picks unasked: what the model runs
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _attend(backend: SDPBackend | None):
    def attend(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attend


def measure(shape: tuple[int, int, int, int], repeats: int) -> list[dict]:
    B, H, S, E = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, E, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    grad_out = torch.randn(B, H, S, E, device="cuda", dtype=torch.bfloat16, generator=gen)
    forward_flops = 2 * B * H * S * S * E  # QKᵀ and PV, 2·S²·E each per head, half of it under the causal mask
    rows, reference = [], None
    for name, backend in BACKENDS.items():
        for compiled in (False, True):
            attend = _attend(backend)
            if compiled:
                torch._dynamo.reset()  # one code object, so a fresh cache per variant instead of recompiles
                attend = torch.compile(attend, fullgraph=True, dynamic=False)
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            try:
                out = attend(*leaves)
                out.backward(grad_out)
            except RuntimeError as error:  # a backend that does not take this shape or GPU
                rows.append({"shape": shape, "backend": name, "compiled": compiled, "error": str(error)[:80]})
                continue
            values = [out.detach().float()] + [t.grad.float() for t in leaves]
            if reference is None:
                reference = values
            diff = max((a - b).abs().max().item() for a, b in zip(values, reference))

            def forward_only():
                with torch.no_grad():
                    attend(*leaves)

            def forward_backward():
                for t in leaves:
                    t.grad = None
                attend(*leaves).backward(grad_out)

            fwd_ms = median_ms(forward_only, repeats)
            fwd_bwd_ms = median_ms(forward_backward, repeats)
            rows.append({
                "shape": shape, "backend": name, "compiled": compiled, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                "fwd_tflops": forward_flops / fwd_ms / 1e9, "fwd_bwd_tflops": 3.5 * forward_flops / fwd_bwd_ms / 1e9,
                "max_diff_vs_default": diff,
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x16x2048x128", "8x16x2048x128", "32x32x2048x80"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
    rows = [row for text in args.shapes for row in measure(tuple(int(x) for x in text.split("x")), args.repeats)]
    print(f"\n{'shape BxHxSxE':>16} {'backend':>9} {'compiled':>8} {'fwd ms':>8} {'fwd+bwd ms':>10} "
          f"{'fwd TF':>7} {'f+b TF':>7} {'max diff':>9}")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        if "error" in row:
            print(f"{shape:>16} {row['backend']:>9} {row['compiled']!s:>8}  error: {row['error']}")
            continue
        print(f"{shape:>16} {row['backend']:>9} {row['compiled']!s:>8} {row['fwd_ms']:8.2f} {row['fwd_bwd_ms']:10.2f} "
              f"{row['fwd_tflops']:7.0f} {row['fwd_bwd_tflops']:7.0f} {row['max_diff_vs_default']:9.2e}")


if __name__ == "__main__":
    main()
