"""Recovery after compression: LoRA through PEFT, trained with the Hugging Face Trainer (the `recover` pass)."""
from .lora import SparsityKeepingLoraLinear
from .pass_ import Recover

__all__ = ["Recover", "SparsityKeepingLoraLinear"]
