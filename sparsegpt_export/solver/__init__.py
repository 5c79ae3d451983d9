"""The solver: one weight matrix and its layer Hessian in, the compressed matrix out. Torch only: it knows
nothing of transformers or of file formats.

- `hessian`: ``H = 2/n X^T X`` streamed from calibration inputs (`HessianAccumulator`);
- `obs`: SparseGPT's column sweep with joint quantization (`sparsegpt_solve`), the layer error; `columns`: the
  sweep's per-column steps (TorchScript where available); `sweep_kernel`: a whole lazy block as one Triton kernel
  (CUDA; imported only when it runs);
- `admm`: least squares on a mask by ADMM (`admm_prune`);
- `update`: the weight-update strategies behind one interface (`solve_layer`, `LayerTask`, `SolveOptions`).
"""
from .admm import admm_prune
from .errors import SolverError
from .hessian import HessianAccumulator, group_windows
from .obs import (SALIENCIES, SolveResult, expand_groups, layer_error, magnitude_prune, measure_error, quad_form,
                  sparsegpt_solve)
from .update import UPDATES, LayerTask, SolveOptions, row_separable, solve_layer

__all__ = ["SALIENCIES", "UPDATES", "HessianAccumulator", "LayerTask", "SolveOptions", "SolveResult", "SolverError",
           "admm_prune", "expand_groups", "group_windows", "layer_error", "magnitude_prune", "measure_error", "quad_form", "row_separable",
           "solve_layer", "sparsegpt_solve"]
