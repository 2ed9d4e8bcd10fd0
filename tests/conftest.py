"""Shared test set-up: GPU tests (marked `gpu`) are skipped where PyTorch sees no CUDA device, and there
Triton kernels run under Triton's interpreter (on CPU tensors), which must be chosen before triton loads."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
