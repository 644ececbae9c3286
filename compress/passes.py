"""Imports that register the built-in passes. Third-party passes use the `compress.passes` entry-point group."""
from .prune import Prune  # noqa: F401
from .vq_logits import VQLogits  # noqa: F401
from .kvcache.pass_ import GearKV  # noqa: F401
from .linearize.pass_ import Linearize  # noqa: F401
from .quantize.pass_ import Quantize  # noqa: F401
from .recover import Recover  # noqa: F401
from .activation_sparsity import ActivationSparsity  # noqa: F401
