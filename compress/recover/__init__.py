"""Recovery after compression: LoRA through PEFT, trained with the Hugging Face Trainer (the `recover` pass)."""
from .pass_ import Recover

__all__ = ["Recover", "SparsityKeepingLoraLinear"]


def __getattr__(name: str):
    if name == "SparsityKeepingLoraLinear":  # imports PEFT: only when asked for
        from .lora import SparsityKeepingLoraLinear

        return SparsityKeepingLoraLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
