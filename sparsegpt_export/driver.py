"""Compatibility names for code written against the first layout (``from sparsegpt_export.driver import ...``).
The pipeline lives in `sparsegpt_export.pipeline`, the model anatomy in `sparsegpt_export.anatomy` and the records
in `sparsegpt_export.records`."""
from .anatomy import (UnsupportedModelError, block_linears, find_blocks, first_hidden, get_weight, is_linear,
                      set_weight, untie_lm_head)
from .pipeline.capture import capture_block_inputs
from .pipeline.loop import compress_model
from .pipeline.state import auto_batch_size, resolve_device
from .records import CompressionResult, LayerRecord

__all__ = ["CompressionResult", "LayerRecord", "UnsupportedModelError", "auto_batch_size", "block_linears",
           "capture_block_inputs", "compress_model", "find_blocks", "first_hidden", "get_weight", "is_linear",
           "resolve_device", "set_weight", "untie_lm_head"]
