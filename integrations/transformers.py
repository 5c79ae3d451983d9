"""transformers plugin: ``AutoModelForCausalLM.from_pretrained`` / ``pipeline`` for ``sparse24`` exports.

``import sparsegpt_export`` registers the quantization config ``quant_method = "sparsegpt"`` and its
``HfQuantizer``. Loading then goes:

1. before the weights are read, the checkpoint's header is checked against ``quantization_config.layers``
   (every tensor present with the shape and dtype its layer record implies, nothing extra, a known
   ``format_version``), and every recorded layer is replaced by a `PackedSparseLinear` whose buffers are
   exactly the stored tensors, so transformers reads the packed bytes straight into them;
2. after loading, each layer becomes a `sparsegpt_export.kernels.Sparse24Linear` (`kernels.plan.build_layer`):
   - on CUDA (sm80+, with triton), 2:4 layers, int4 or float16/bfloat16, keep their packed tensors on the device
     (a CUTLASS-layout file is repacked once) and run on the package's Triton kernels through a per-M dispatch
     table measured once per distinct layer shape against dense;
   - everywhere else (CPU, no triton, older GPUs, other patterns, shapes the kernels do not take) the layer is
     decoded once (the same code as `converters.sparse24.load_state_dict`, so the weights are bit-identical to
     that path) into a dense weight.
   ``model.sparsegpt_load_report`` lists what each layer got (kernel kind and dispatch, or dense) and why. The
   quantizer is compileable: ``generate(..., cache_implementation="static")`` compiles the decode step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparsegpt_export.converters import sparse24
from sparsegpt_export.converters.dense import dtype_name, resolve_dtype

logger = logging.getLogger("sparsegpt_export")

QUANT_METHOD = "sparsegpt"


class SparseGPTQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a ``sparse24`` export (written by `converters.sparse24.export`)."""

    def __init__(self, format: str = sparse24.FORMAT, format_version: int = sparse24.FORMAT_VERSION,
                 dtype: str = "float16", pattern: Optional[str] = None, bits: Optional[int] = None,
                 group_size: Optional[int] = None, sym: bool = True, layers: Optional[dict] = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.dtype = dtype
        self.pattern = pattern
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.layers = dict(layers or {})
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.post_init()

    def post_init(self) -> None:
        if self.format != sparse24.FORMAT:
            raise ValueError(f"quantization_config: format {self.format!r} is not loadable by transformers "
                             f"(only {sparse24.FORMAT!r}; a 'dense' export has no quantization_config)")
        v = self.format_version
        if not isinstance(v, int) or not 1 <= v <= sparse24.FORMAT_VERSION:
            raise ValueError(f"quantization_config: sparse24 format_version {v!r} is not supported by this "
                             f"sparsegpt-export (it reads 1..{sparse24.FORMAT_VERSION}); upgrade the package")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"quantization_config: dtype {self.dtype!r} must be float16, bfloat16 or float32")


class PackedSparseLinear(nn.Module):
    """Placeholder for one compressed layer while transformers reads the checkpoint: its buffers are the stored
    tensors of `converters.sparse24` (``codes``, ``positions``, ``scales``...). Replaced right after loading by a
    `Sparse24Linear`, or, where the model's layer is an ``nn.Linear`` subclass with its own forward
    (``own_forward``), by that module holding the decoded weight; it cannot run."""

    def __init__(self, name: str, record: dict, value_dtype: torch.dtype, bias: Optional[torch.Tensor],
                 own_forward: Optional[nn.Module] = None):
        super().__init__()
        self.__dict__["own_forward"] = own_forward  # not a submodule: its weights are not the checkpoint's
        self.layer_name = name
        self.record = record
        self.value_dtype = value_dtype
        self.out_features, self.in_features = record["shape"]
        for suffix, (shape, dtype) in sparse24.layer_tensor_specs(record, value_dtype).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device="meta"))
        self.bias = None if bias is None else nn.Parameter(torch.empty(bias.shape, dtype=bias.dtype, device="meta"),
                                                           requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """A weightless stand-in, for model code that touches ``.weight`` while loading (e.g. GPT-2's init)."""
        return torch.empty(self.out_features, self.in_features, dtype=self.value_dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - replaced at load
        raise RuntimeError(f"layer {self.layer_name}: packed sparse24 weights are decoded at load; "
                           "this placeholder cannot run")


def _header(files: list[str]) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """Shapes and dtypes of every tensor in ``files`` and the metadata of the first, without reading data."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    meta: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = meta or dict(sf.metadata() or {})
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{f}: cannot be read as safetensors ({e}); the file is truncated or corrupt") from None
    return shapes, meta


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8,
              "I16": torch.int16, "F64": torch.float64, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


def check_checkpoint(files: list[str], config: SparseGPTQuantizationConfig) -> None:
    """Every layer's tensors are in ``files`` with the shape and dtype its record implies; else a ValueError
    naming the file, layer and tensor. Runs before any weight is read."""
    shapes, meta = _header(files)
    where = files[0] if len(files) == 1 else Path(files[0]).parent
    version = meta.get("format_version")
    if version is not None and (not version.isdigit() or int(version) > sparse24.FORMAT_VERSION):
        raise ValueError(f"{where}: sparse24 format_version {version} is newer than this package reads "
                         f"({sparse24.FORMAT_VERSION})")
    value_dtype = resolve_dtype({}, config.dtype)
    for name, rec in config.layers.items():
        try:
            specs = sparse24.layer_tensor_specs(rec, value_dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: layer {name}: malformed layer record in config.json ({e!r})") from None
        for suffix, (shape, dtype) in specs.items():
            key = f"{name}.{suffix}"
            if key not in shapes:
                raise ValueError(f"{where}: tensor {key} of layer {name} is missing")
            got_shape, got_dtype = shapes[key]
            if got_shape != tuple(shape) or _ST_DTYPES.get(got_dtype) != dtype:
                raise ValueError(f"{where}: layer {name}: {key} has shape {got_shape} {got_dtype}, expected "
                                 f"{tuple(shape)} {dtype_name(dtype)} for the recorded shape {tuple(rec['shape'])}")
        extra = [k for k in shapes if k.rpartition(".")[0] == name and k.rpartition(".")[2] not in specs
                 and k.rpartition(".")[2] != "bias"]
        if extra:
            raise ValueError(f"{where}: unexpected tensors {extra[:3]} (not used by layer {name}'s recorded pattern)")


def _load_layer(model: nn.Module, name: str, mod: PackedSparseLinear, dtype: torch.dtype, folder: Any,
                cache: dict) -> dict:
    """Replace the placeholder ``name`` by its `Sparse24Linear` (kernels, or dense and why); its report row."""
    from sparsegpt_export.kernels import build_layer

    stored = {sfx: getattr(mod, sfx) for sfx in sparse24.layer_tensor_specs(mod.record, mod.value_dtype)}
    device = next(iter(stored.values())).device

    def decode() -> torch.Tensor:  # on the CPU (numpy bit unpacking), the same rounding path as load_state_dict
        cpu = {k: v.cpu() for k, v in stored.items()}

        def take(sfx: str) -> torch.Tensor:
            return sparse24.checked_tensor(cpu[sfx], name, sfx, mod.record, mod.value_dtype, folder)

        w = sparse24.decode_layer(name, {**mod.record, "transposed": False}, take, folder)
        return w.to(mod.value_dtype).to(dtype)

    own = mod.own_forward
    try:
        if own is not None:  # an nn.Linear subclass with its own forward (DeepSeek-V4's grouped o_a_proj)
            own.weight = nn.Parameter(decode().to(device), requires_grad=False)
            if own.bias is not None:
                own.bias = nn.Parameter(mod.bias.detach().to(device, dtype), requires_grad=False)
            layer, info = own, {"kernel": "dense", "reason": f"{type(own).__name__} has its own forward: the decoded "
                                                              "weight in the model's own module"}
        else:
            layer, info = build_layer(mod.record, stored, decode, dtype, device, mod.bias, cache)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if name in msg else f"layer {name}: {msg}") from None
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return {"layer": name, **info}


class SparseGPTHfQuantizer(HfQuantizer):
    """Loads ``sparse24`` exports (pre-quantized only; compression itself is `SparseGPTQuantizer`)."""

    requires_calibration = True
    quantization_config: SparseGPTQuantizationConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("sparsegpt: transformers can only load sparse24 exports; compress a model with "
                             "`sparsegpt-export compress` or `SparseGPTQuantizer`")

    def update_dtype(self, dtype: Optional[torch.dtype]) -> torch.dtype:
        return dtype if dtype is not None else resolve_dtype({}, self.quantization_config.dtype)

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Optional[list] = None,
                                             **kwargs: Any) -> None:
        cfg = self.quantization_config
        if checkpoint_files:
            check_checkpoint([str(f) for f in checkpoint_files], cfg)
            sparse24.verify_files(Path(checkpoint_files[0]).parent, {"sha256": getattr(cfg, "sha256", None)})
        value_dtype = resolve_dtype({}, cfg.dtype)
        for name, rec in cfg.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config names layer {name}, which {type(model).__name__} does not "
                                 "have; the checkpoint and its config.json do not match") from None
            w = getattr(old, "weight", None)
            if w is None or w.dim() != 2:
                raise ValueError(f"layer {name}: {type(old).__name__} is not a linear layer")
            shape = tuple(w.shape[::-1]) if rec.get("transposed") else tuple(w.shape)
            if shape != tuple(rec["shape"]):
                raise ValueError(f"layer {name}: the model's weight is {shape}, the record says {tuple(rec['shape'])}")
            parent, _, child = name.rpartition(".")
            custom = isinstance(old, nn.Linear) and type(old).forward is not nn.Linear.forward
            setattr(model.get_submodule(parent) if parent else model, child,
                    PackedSparseLinear(name, rec, value_dtype, getattr(old, "bias", None), old if custom else None))
        self._folder = Path(checkpoint_files[0]).parent if checkpoint_files else "checkpoint"

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        cache: dict = {}  # one dispatch measurement per distinct layer shape
        rows = [_load_layer(model, name, mod, dtype, self._folder, cache)
                for name, mod in list(model.named_modules()) if isinstance(mod, PackedSparseLinear)]
        rows += [{"layer": name, "kernel": "dense", "reason": why}  # fused 3-D experts: see sparse24.fused_expert_notes
                 for name, why in (getattr(self.quantization_config, "dense_params", None) or {}).items()]
        on_kernels = sum(r["kernel"] != "dense" for r in rows)
        model.sparsegpt_load_report = {"layers": rows, "kernels": on_kernels, "dense": len(rows) - on_kernels}
        fallbacks = sorted({r["reason"] for r in rows if r["kernel"] == "dense"})
        logger.info("sparsegpt: %d of %d compressed layers on the 2:4 kernels, %d dense (%s)",
                    on_kernels, len(rows), len(rows) - on_kernels, "; ".join(fallbacks) or "-")
        return model

    @property
    def is_compileable(self) -> bool:
        """The kernels are custom ops with fake implementations: ``generate(..., cache_implementation="static")``
        compiles the decode step and captures it in CUDA graphs."""
        return True

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparseGPTQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparseGPTHfQuantizer)
