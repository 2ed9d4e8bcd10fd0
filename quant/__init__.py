"""quant: reduced-precision training paths that plug into our Transformer without changing it.

Modules:
    hadamard  orthogonal Hadamard rotations of any axis: full (Sylvester x Paley factors, any size) and
              block-diagonal (`rotate_blocks`, H_256 blocks in one GEMM: HALO's fast path)
    halo      HALO: FP8 e4m3 forward / input-gradient / weight-gradient GEMMs with Hadamard rotations;
              `apply_halo(model, level=...)` swaps the block linears in place
    qlora     QLoRA: NF4 frozen base (bitsandbytes), LoRA (peft), paged AdamW, PEFT/HF export;
              import it as `quant.qlora` (it loads bitsandbytes and peft, which `import quant` does not)
"""

from quant.hadamard import hadamard_layout, hadamard_matrix, rotate, rotate_blocks
from quant.halo import HaloLinear, apply_halo, halo_matmul, quantize_fp8

__all__ = ["HaloLinear", "apply_halo", "hadamard_layout", "hadamard_matrix", "halo_matmul", "quantize_fp8", "rotate", "rotate_blocks"]
