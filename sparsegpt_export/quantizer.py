"""`SparseGPTQuantizer`: the Optimum-style Python API.

    from sparsegpt_export import SparseGPTQuantizer
    quantizer = SparseGPTQuantizer(pattern="2:4", bits=4, group_size=128, dataset="c4", nsamples=128, seqlen=2048)
    model = quantizer.quantize_model(model, tokenizer)      # in place; quantizer.report holds the per-layer rows
    quantizer.save(model, "out/")

or, from a checkpoint: ``SparseGPTQuantizer.from_pretrained("smollm2-135m", pattern="2:4").quantize("out/")``.
It has the method names of ``optimum.gptq.GPTQQuantizer`` (``quantize_model``, ``save``, ``to_dict``,
``from_dict``) and subclasses ``optimum.quantization_base.OptimumQuantizer``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .calibration import DatasetSpec, get_calibration_data
from .config import SparseGPTConfig
from .pipeline import compress_model
from .records import CompressionResult
from .io import check_writable, save_compressed, save_streamed

try:  # optimum is a dependency; keep the API usable if a broken install lacks it
    from optimum.quantization_base import OptimumQuantizer as _Base
except Exception:  # pragma: no cover
    _Base = object


SENSITIVITY_CACHE = "sparsegpt-sensitivity.json"


class SparseGPTQuantizer(_Base):
    def __init__(self, config: Optional[SparseGPTConfig] = None, *, dataset: DatasetSpec | None = None, **kwargs: Any):
        if config is not None and kwargs:
            config = SparseGPTConfig.from_dict({**config.to_dict(), **kwargs})
        elif config is None:
            if isinstance(dataset, (str, os.PathLike)):
                kwargs["dataset"] = str(dataset)
            elif dataset is not None:
                kwargs["dataset"] = None
            config = SparseGPTConfig(**kwargs)
        self.config = config
        self.dataset = dataset if dataset is not None else config.dataset
        self.model: Any = None
        self.tokenizer: Any = None
        self.model_name = ""
        self.result: Optional[CompressionResult] = None
        self.offload = "cpu"  # where the model lives between blocks: see from_pretrained
        self.offload_dir: Optional[Path] = None
        self.max_memory: Optional[int] = None
        self._store: Any = None

    # ---------------------------------------------------------------- Optimum / GPTQQuantizer method names
    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "SparseGPTQuantizer":
        return cls(config=SparseGPTConfig.from_dict(config_dict))

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike, file_name: Optional[str] = None, *,
                        config: Optional[SparseGPTConfig] = None, dtype: Optional[str] = None, offload: str = "cpu",
                        offload_dir: Optional[str | os.PathLike] = None, max_memory: Optional[str | int] = None,
                        **kwargs: Any) -> "SparseGPTQuantizer":
        """Load a checkpoint (local folder, hub name or a built-in name such as ``smollm2-135m``) to compress.

        ``offload``: ``"cpu"`` (default) keeps the model in host memory and moves one block at a time to the
        compute device; ``"none"`` loads it whole onto the compute device; ``"disk"`` keeps it in its safetensors
        files and streams one block at a time (see :mod:`sparsegpt_export.offload`), staging finished blocks in
        ``offload_dir`` (default: beside the output). ``max_memory`` (``"20GiB"``, bytes): what the calibration
        activations may take on the compute device before they are kept in host memory.
        """
        from .families import check_checkpoint
        from .models import load_model, resolve_model
        from .offload import OFFLOAD_MODES, OffloadError, load_skeleton, parse_memory

        if offload not in OFFLOAD_MODES:
            raise OffloadError(f"--offload: {offload!r} is not one of {OFFLOAD_MODES}")
        check_checkpoint(resolve_model(str(model_or_path)))  # a refused model type: one line, before any loading
        q = cls(config=config, **kwargs)
        q.offload, q.offload_dir = offload, Path(offload_dir) if offload_dir else None
        q.max_memory = parse_memory(max_memory) if isinstance(max_memory, str) else max_memory
        if offload == "disk":
            from transformers import AutoTokenizer

            from . import hostmem

            hostmem.returns_memory()  # before anything large is built: see sparsegpt_export.hostmem

            path = resolve_model(str(model_or_path))
            q.model = load_skeleton(path, dtype)
            try:
                q.tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                q.tokenizer = None
        else:
            dev = q.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            q.model, q.tokenizer = load_model(str(model_or_path), dtype=dtype,
                                              device_map=dev if offload == "none" and dev != "cpu" else None)
        q.model_name = str(model_or_path)
        return q

    @property
    def report(self) -> Optional[dict[str, Any]]:
        return self.result.report if self.result else None

    def get_calibration_dataset(self, tokenizer: Any = None) -> torch.Tensor:
        if self.dataset is None:
            raise ValueError("dataset: no calibration data given (a name, a file, a list of strings or input_ids)")
        return get_calibration_data(self.dataset, tokenizer, self.config.nsamples, self.config.seqlen, self.config.seed)

    def quantize_model(self, model: Any, tokenizer: Any = None, *, progress: bool = True,
                       checkpoint_dir: Optional[str | os.PathLike] = None, resume: bool = False,
                       sensitivity_cache: Optional[str | os.PathLike] = None) -> Any:
        """Compress ``model`` in place; returns it. The per-layer report is ``self.report``.

        ``sensitivity_cache``: a JSON file keeping the sensitivity scores between runs (``config.sensitivity_cache``
        wins when set)."""
        calib = self.get_calibration_dataset(tokenizer)
        name = self.model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        self.result = compress_model(model, calib, self.config, progress=progress, checkpoint_dir=checkpoint_dir,
                                     resume=resume, model_name=str(name), sensitivity_cache=sensitivity_cache,
                                     store=self._store, max_memory=self.max_memory)
        self.model, self.tokenizer = model, tokenizer if tokenizer is not None else self.tokenizer
        return model

    def save(self, model: Any, save_dir: str | os.PathLike, overwrite: bool = False, tokenizer: Any = None) -> Path:
        if self.result is None:
            raise RuntimeError("save: call quantize_model first")
        return save_compressed(model, tokenizer if tokenizer is not None else self.tokenizer, self.result, save_dir, overwrite)

    def quantize(self, save_dir: str | os.PathLike, file_prefix: Optional[str] = None, *, overwrite: bool = False,
                 progress: bool = True, resume: bool = False, **kwargs: Any) -> Path:
        """Compress the model loaded by ``from_pretrained`` and write it to ``save_dir`` (atomically).

        A checkpoint is kept beside ``save_dir`` after every block; ``resume=True`` continues from it. Sensitivity
        scores (``allocation="sensitivity"``, ``dense_fraction``, ``mix_fraction``) are cached beside it too, in
        ``sparsegpt-sensitivity.json``, so that a run at another sparsity reuses them.
        """
        if self.model is None:
            raise RuntimeError("quantize: no model; use SparseGPTQuantizer.from_pretrained(...) or quantize_model()")
        from . import distributed

        out = check_writable(save_dir, overwrite=overwrite)
        ckpt = out.absolute().parent / f".{out.name}.sparsegpt-checkpoint"
        if self.offload_dir is not None:
            ckpt = self.offload_dir / f"{out.name}.sparsegpt-checkpoint"
        self._store = None
        if self.offload == "disk":
            from .anatomy import find_blocks
            from .offload import DiskStore, SafetensorsSource

            path, blocks = find_blocks(self.model)
            self._store = DiskStore(self.model, SafetensorsSource(self.model.config._name_or_path), ckpt, path,
                                    len(blocks))
        try:
            self.quantize_model(self.model, self.tokenizer, progress=progress, checkpoint_dir=ckpt, resume=resume,
                                sensitivity_cache=out.absolute().parent / SENSITIVITY_CACHE)
            d = distributed.current()
            if d is None or d.is_main:  # with several ranks, rank 0 writes (every rank holds the same result)
                if self._store is not None:
                    save_streamed(self.model, self.tokenizer, self.result, out, self._store, overwrite=overwrite)
                else:
                    self.save(self.model, out, overwrite=overwrite)
        finally:
            self._store = None
        distributed.barrier(d, "the final barrier")
        if d is None or d.is_main:
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
        return out
