"""Weight pruning: magnitude (more methods build on the same masks)."""
from .pass_ import Prune

__all__ = ["Prune"]
