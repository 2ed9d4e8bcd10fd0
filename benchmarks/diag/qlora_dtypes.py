"""Which dtypes streamed QLoRA's block modules see on this machine (issue 7 diagnosis).

    python -m benchmarks.diag.qlora_dtypes [--preset llama3-8b] [--num-layers 2] [--seq-len 2048]

Builds the streamed model as `benchmarks.qlora --variants ours-stream` does (random init on the GPU), runs one
step with forward hooks on every module of block 0 and prints each module's input and output dtypes, once
per pass (forward without a graph, recompute with one).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.qlora import LORA, init_on_gpu, model_config, synthetic_batches
    from fuyou.models import build_model
    from offload import TieredStore
    from quant.qlora import make_paged_adamw
    from quant.qlora_stream import StreamedQLoRA, build_streamed_qlora

    args.batch_size, args.steps = 1, 1
    device = torch.device("cuda", torch.cuda.current_device())
    store = TieredStore(device=device)

    def materialize(piece):
        piece.to_empty(device=device)
        init_on_gpu(piece)

    model, payloads = build_streamed_qlora(build_model(model_config(args), device="meta"), store=store, device=device,
                                           materialize=materialize, rank=LORA["rank"], alpha=LORA["alpha"],
                                           dropout=LORA["dropout"])
    trainer = StreamedQLoRA(model, payloads, store, device=device, optimizer=make_paged_adamw(model, lr=1e-4, optim_bits=8),
                            lr=1e-4, warmup_steps=0, total_steps=1, precision="bf16")
    seen: dict[tuple[str, bool], str] = {}

    def hook(name):
        def record(module, inputs, output):
            dtype_in = next((x.dtype for x in inputs if isinstance(x, torch.Tensor)), None)
            seen.setdefault((name, torch.is_grad_enabled()), f"{dtype_in} -> {getattr(output, 'dtype', None)}")
        return record

    block = model.get_base_model().blocks[0]
    for name, module in block.named_modules():
        if name:
            module.register_forward_hook(hook(name))
    trainer.step([next(synthetic_batches(args))])
    print(f"torch {torch.__version__}, autocast enabled inside the step: see the rows; torch.is_autocast_enabled() "
          f"outside: {torch.is_autocast_enabled()}")
    for (name, grad), dtypes in seen.items():
        print(f"{'recompute' if grad else 'forward  '} {name:45s} {dtypes}")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
