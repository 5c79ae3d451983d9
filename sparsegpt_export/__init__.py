"""sparsegpt-export: SparseGPT pruning (2:4, 4:8, N:M, unstructured) with joint low-bit quantization, and
exports that serving stacks load."""
from pathlib import Path as _Path

# Installed, `converters/` and `integrations/` are subfolders of this package (setuptools package-dir). Run
# from a source checkout (`python -m sparsegpt_export` in the project root), they are its siblings: add the
# root to this package's path so that `sparsegpt_export.converters` and `.integrations` resolve the same way.
_here = _Path(__file__).resolve().parent
if not (_here / "converters").is_dir() and (_here.parent / "converters" / "sparse24.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821  (the package's own __path__)

from .calibration import CalibrationError, get_calibration_data
from .config import ConfigError, SparseGPTConfig, parse_pattern
from .driver import CompressionResult, LayerRecord, UnsupportedModelError, compress_model, find_blocks
from .quantizer import SparseGPTQuantizer
from .solver import HessianAccumulator, SolverError, magnitude_prune, sparsegpt_solve

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "CompressionResult", "ConfigError", "HessianAccumulator", "LayerRecord", "SolverError",
    "SparseGPTConfig", "SparseGPTQuantizer", "UnsupportedModelError", "compress_model", "find_blocks",
    "get_calibration_data", "magnitude_prune", "parse_pattern", "sparsegpt_solve", "__version__",
]

# `import sparsegpt_export` makes transformers load sparse24 exports (quant_method "sparsegpt")
from .integrations.transformers import register as _register_transformers  # noqa: E402

_register_transformers()
