"""Fuyou: full fine-tuning of large language models on one consumer GPU.

`import fuyou` stays light: it imports neither deepspeed, kvikio nor transformers; the heavy
parts load on first use.
"""

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainConfig", "__version__"]


def __getattr__(name):
    # Lazy so that `import fuyou` (and `fuyou --help`) do not pay for torch start-up twice.
    if name == "Trainer":
        from fuyou.trainer import Trainer

        return Trainer
    if name == "TrainConfig":
        from fuyou.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'fuyou' has no attribute {name!r}")
