"""quant: reduced-precision training paths that plug into our Transformer without changing it.

Modules:
    hadamard  orthogonal Hadamard rotations of any axis: full (Sylvester x Paley factors, any size) and
              block-diagonal (`rotate_blocks`, H_256 blocks in one GEMM: HALO's fast path)
    halo      HALO: FP8 e4m3 forward / input-gradient / weight-gradient GEMMs with Hadamard rotations;
              `apply_halo(model, level=...)` swaps the block linears in place
    delayed_scaling  HALO's delayed scaling: per-layer amax histories, scales from them, end_step
    fp8_cast  a Triton kernel casting bf16 to FP8 in both layouts with the amax recorded (CUDA; needs Triton)
    halo_mlp  the GPT MLP under HALO with GELU and its derivative inside fp8_cast's casts
    qlora     QLoRA: NF4 frozen base (bitsandbytes), LoRA (peft), paged AdamW, PEFT/HF export;
              import it as `quant.qlora` (it loads bitsandbytes and peft, which `import quant` does not)
"""

from quant.hadamard import hadamard_layout, hadamard_matrix, rotate, rotate_blocks
from quant.halo import HaloLinear, apply_halo, halo_matmul, quantize_fp8

__all__ = ["HaloLinear", "apply_halo", "hadamard_layout", "hadamard_matrix", "halo_matmul", "quantize_fp8", "rotate", "rotate_blocks"]
