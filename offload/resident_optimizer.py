"""AdamW for a group whose weights stay on the compute device: its moments stay there too.

The runtime keeps the outer group (embeddings, final norm, LM head) resident on the compute device in
fp32 for the whole step. Through the CPU optimizer its update is the serial tail of every step: the
gradient out over PCIe, AdamW on the CPU after block 0's, the weights back in, and only then can the
next forward start. On the H100 host with the GPT-3 6.7B shape (0.21B outer parameters) that tail was
about 0.1 s of a 3.5 s step with the GPU idle (benchmarks/RESULTS.md, issue 4). Here the update runs
where the weights are, in a few milliseconds on the GPU, at the price of the moments in GPU memory
(8 B per parameter: 1.7 GB for 6.7B's outer group; too much for a 128k-vocabulary 70B, whose outer
group then stays with the CPU optimizer).

The arithmetic is the same library kernel as the CPU optimizer's (`offload.cpu_optimizer.AdamWKernel`,
torch's fused AdamW, which runs on CUDA and CPU tensors alike). It is never speculative: the update runs
once the step's global gradient norm, and so the clip factor, is known, because here that costs nothing
(it is already the last work before the next forward) and it needs no fix-up.

Legend: parts are flat fp32 tensors, [n], one per weight-decay class (fuyou.runtime.split_parts).
"""

from __future__ import annotations

import torch

from offload.cpu_optimizer import AdamWKernel
from offload.store import Tier, TieredStore
from offload.streams import wait_for_device


class ResidentAdamW:
    """AdamW over flat fp32 parts that live on the compute device, with their moments beside them.

    Args:
        store: allocates the moments on `tier` (counted against its cap).
        masters: the parts' fp32 weights, updated in place (the model's own parameters are views of them).
        weight_decays: one per part.
        tier: the compute device's tier (GPU; CPU on a machine without CUDA).
        kernel: the AdamW kernel (torch's fused AdamW).
    """

    def __init__(self, store: TieredStore, masters: list[torch.Tensor], weight_decays: list[float], tier: Tier,
                 kernel: AdamWKernel) -> None:
        self.masters, self.weight_decays, self.kernel = masters, weight_decays, kernel
        self.moments = []
        for master in masters:
            moments_2N = store.empty((2, master.numel()), torch.float32, tier)  # exp_avg, exp_avg_sq
            moments_2N.zero_()
            self.moments.append(moments_2N)
        self.step_count = 0  # Adam's t
        self._grads: list[torch.Tensor] | None = None

    def take_gradients(self, grads: list[torch.Tensor]) -> float:
        """Hold the step's complete fp32 gradient of each part (flat, on the device) until `update`.

        Returns:
            Its squared L2 norm, summed over parts' fp32 norms as the CPU optimizer takes them (waits for
            the device).
        """
        self._grads = grads
        norms_P = torch.stack([torch.linalg.vector_norm(grad) for grad in grads])
        wait_for_device(norms_P.device)  # sleep without the GIL: the CPU optimizer is finishing block 0 meanwhile
        norms = norms_P.tolist()
        return sum(norm**2 for norm in norms)

    def update(self, *, lr: float, clip: float = 1.0) -> None:
        """One AdamW step with the held gradient scaled by `clip`, queued on the device's stream."""
        assert self._grads is not None, "update() without take_gradients() this step"
        self.step_count += 1
        for master, grad, moments_2N, weight_decay in zip(self.masters, self._grads, self.moments, self.weight_decays):
            self.kernel.step(master, grad, moments_2N[0], moments_2N[1], step=self.step_count, lr=lr,
                             weight_decay=weight_decay, clip=clip)
        self._grads = None
