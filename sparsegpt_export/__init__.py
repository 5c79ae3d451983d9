"""sparsegpt-export: SparseGPT pruning (2:4, 4:8, N:M, unstructured) with joint low-bit quantization, and
exports that serving stacks load."""
# `converters/` and `integrations/` are top-level folders of the project, installed as subpackages of this one
# (setuptools package-dir); a source checkout runs after `pip install -e .`.
from .calibration import CalibrationError, get_calibration_data
from .config import ConfigError, SparseGPTConfig, parse_pattern
from .anatomy import UnsupportedModelError, find_blocks
from .pipeline import compress_model
from .records import CompressionResult, LayerRecord
from .solver import HessianAccumulator, SolverError, magnitude_prune, sparsegpt_solve

__version__ = "0.1.0"


def __getattr__(name: str):
    """``SparseGPTQuantizer`` (an Optimum quantizer: optimum is imported when it is first used)."""
    if name == "SparseGPTQuantizer":
        from .quantizer import SparseGPTQuantizer

        return SparseGPTQuantizer
    raise AttributeError(f"module 'sparsegpt_export' has no attribute {name!r}")


__all__ = [
    "CalibrationError", "CompressionResult", "ConfigError", "HessianAccumulator", "LayerRecord", "SolverError",
    "SparseGPTConfig", "SparseGPTQuantizer", "UnsupportedModelError", "compress_model", "find_blocks",
    "get_calibration_data", "magnitude_prune", "parse_pattern", "sparsegpt_solve", "__version__",
]

# `import sparsegpt_export` makes transformers load sparse24 exports (quant_method "sparsegpt")
from .integrations.transformers import register as _register_transformers  # noqa: E402

_register_transformers()
