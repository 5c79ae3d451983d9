"""GPU serving of 2:4 weights: Triton kernels for packed int4 2:4 and fp16/bf16 2:4 weight-only linears
(`triton_kernels`, imported only when they run), registered as PyTorch custom ops (`ops`:
``torch.ops.sparsegpt.int4_24_mm`` / ``fp16_24_mm``), the runtime layout repacked once at load from the
``sparse24`` file (`layout`), the `Sparse24Linear` module with its per-M dispatch (`module`) and the load-time
choices (`plan`). Importing this package needs neither triton nor a GPU."""
from . import ops  # noqa: F401  (registers the custom ops)
from .layout import FP16, INT4, dense_from_layout, pack_24
from .module import DEFAULT_DISPATCH, Sparse24Linear
from .plan import build_layer, kernel_kind

__all__ = ["FP16", "INT4", "DEFAULT_DISPATCH", "Sparse24Linear", "build_layer", "dense_from_layout", "kernel_kind",
           "pack_24"]
