"""`OnnxCausalLM`: a transformers generation model over an ONNX Runtime session of ``export --format onnx``.

It is a `PreTrainedModel` with `GenerationMixin` and no torch weights: `forward` feeds the graph
``input_ids``, ``attention_mask``, ``position_ids`` and the past keys and values of a `DynamicCache`, and
returns the logits and the grown cache. So the ordinary ``generate`` (greedy, sampling, beams) and
``transformers.pipeline("text-generation", model=OnnxCausalLM.from_pretrained(OUT), tokenizer=...)`` work as
with Optimum's ORT models.

```python
from sparsegpt_export.onnx import OnnxCausalLM
model = OnnxCausalLM.from_pretrained("OUT-onnx", num_threads=2)
out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=32, do_sample=False)
```
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import AutoConfig, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_FILE = "model.onnx"
SIDECAR = "sparsegpt_onnx.json"


class OnnxModelError(ValueError):
    """The ONNX folder is incomplete or does not match what the runner expects; the message names the file."""


def check_external_data(path: Path) -> list[Path]:
    """The external-data files ``path`` refers to, each checked to exist and to be long enough."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file
        raise OnnxModelError(f"{path}: cannot be read as an ONNX model ({e})") from None
    needed: dict[Path, int] = {}
    for t in proto.graph.initializer:
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            f = path.parent / info.location
            end = (info.offset or 0) + (info.length or 0)
            needed[f] = max(needed.get(f, 0), end)
    for f, end in needed.items():
        if not f.is_file():
            raise OnnxModelError(f"{path}: its weights live in the external-data file {f.name}, which is missing from {path.parent}")
        if f.stat().st_size < end:
            raise OnnxModelError(f"{f}: external-data file is truncated ({f.stat().st_size} bytes, the graph reads up to {end})")
    return list(needed)


class OnnxCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM whose forward runs an ONNX Runtime session (see the module docstring)."""

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, config, session=None, model_dir: Optional[Path] = None):
        super().__init__(config)
        self.session = session
        self.model_dir = model_dir
        self.share_kv_buffer = False
        self.torch_threads: Optional[int] = 1  # torch's threads while generate() runs (see `generate`)
        self.export_info: dict = {}
        self._vocab: Any = None  # the logits' last dimension when the graph fixes it
        # no weights: a zero-size buffer gives the model its device and dtype (inputs and outputs live on the CPU)
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float32), persistent=False)
        if session is not None:
            self._inputs = {i.name: i for i in session.get_inputs()}
            self._outputs = [o.name for o in session.get_outputs()]
            self._vocab = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits"), None)
            self._past_names = [n for n in self._inputs if n.startswith("input.past_key_values.")]
            self.num_layers = len(self._past_names) // 2
            past = self._inputs[self._past_names[0]].shape if self._past_names else [None] * 4
            text = config.get_text_config()
            heads = getattr(text, "num_attention_heads", None) or 1
            self._kv_heads = past[1] if isinstance(past[1], int) else getattr(text, "num_key_value_heads", None) or heads
            self._head_dim = past[3] if isinstance(past[3], int) else (
                getattr(text, "head_dim", None) or text.hidden_size // heads)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, num_threads: Optional[int] = None,
                        providers: Optional[list] = None, session_options: Any = None,
                        share_kv_buffer: Optional[bool] = None, torch_threads: Optional[int] = 1,
                        **_ignored) -> "OnnxCausalLM":
        """Open ``model_dir/model.onnx`` (its external data checked first) in ONNX Runtime on the CPU.

        ``num_threads``: intra-op threads (ONNX Runtime's default is every core of the machine);
        ``providers`` / ``session_options``: passed to ``onnxruntime.InferenceSession`` as they are;
        ``share_kv_buffer``: let the graph write the KV cache in place (IO binding) instead of returning a grown
        copy each step; default: on for the ``gqa`` graph, which supports it, off for the traced one;
        ``torch_threads``: torch's intra-op threads while ``generate`` runs (default 1; None: leave torch's setting),
        see `generate`.
        """
        import onnxruntime as ort

        d = Path(model_dir)
        path = d / MODEL_FILE
        if not path.is_file():
            raise OnnxModelError(f"{d}: no {MODEL_FILE}; is this the output of `sparsegpt-export export --format onnx`?")
        check_external_data(path)
        config = AutoConfig.from_pretrained(str(d))
        opts = session_options or ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - names
        if missing or "logits" not in {o.name for o in session.get_outputs()}:
            raise OnnxModelError(f"{path}: not a generation graph of this package (inputs {sorted(names)})")
        model = cls(config, session, d)
        gen = d / "generation_config.json"
        if gen.is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(d))
        side = d / SIDECAR
        model.export_info = json.loads(side.read_text()) if side.is_file() else {}
        # the gqa graph's GroupQueryAttention can write the cache in place; the traced graph cannot
        model.share_kv_buffer = (model.export_info.get("onnx_graph") == "gqa" if share_kv_buffer is None
                                 else bool(share_kv_buffer))
        model.torch_threads = torch_threads
        model.eval()
        return model

    def can_generate(self) -> bool:  # noqa: D102
        return True

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate` as it is, with torch on ``torch_threads`` threads (default 1) while it runs.

        Between two forwards, ``generate`` runs torch ops over vectors of the vocabulary's size (the next-token
        logits' copy, logits processors, stopping criteria, argmax or sampling). On torch's default thread pool each
        of these wakes threads that then compete with ONNX Runtime's for the same cores; on SmolLM2 with 2 threads
        that cost more per token than the int4 graph's whole forward (`benchmarks/results/onnx_cpu.md`). On one
        thread they take microseconds. Left alone when a torch ``assistant_model`` is given (its forwards want the
        threads) or ``torch_threads`` is None."""
        assistant = kwargs.get("assistant_model")
        keep = self.torch_threads is None or (assistant is not None and not isinstance(assistant, OnnxCausalLM))
        with contextlib.nullcontext() if keep else _torch_threads(self.torch_threads):
            return super().generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Inputs and outputs are torch tensors on the CPU (the session's own device is ONNX Runtime's business)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # ------------------------------------------------------------------ running
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Any = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        if self.session is None:
            raise OnnxModelError("OnnxCausalLM has no session; build it with OnnxCausalLM.from_pretrained(DIR)")
        if past_key_values is None:  # transformers >= 5.24 passes the cache as ``cache``
            past_key_values = kwargs.pop("cache", None)
        input_ids = input_ids.cpu()
        batch, seq = input_ids.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        attention_mask = attention_mask.cpu().long()
        if attention_mask.shape[1] != past_len + seq:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, the cache and input {past_len + seq}")
        if self.export_info.get("positions") == "absolute":
            # rotary inside GroupQueryAttention (see converters.onnx): each row's absolute index, whatever the
            # caller's position_ids; a left-padded row is shifted by its padding everywhere, keys and queries alike,
            # so its attention (relative positions) is transformers'
            position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
        elif position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = position_ids.cpu().long().numpy()
        if self.share_kv_buffer:
            logits, cache = self._run_shared(feeds, past_key_values, batch, past_len + seq)
        else:
            logits, pairs = self._run(feeds, past_key_values, batch, past_len)
            cache = _cache_of(pairs)
        if use_cache is False:
            cache = None
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _run(self, feeds: dict, past, batch: int, past_len: int):
        """Plain ``session.run``: the past as numpy inputs, the presents (past + new) as new outputs."""
        for i in range(self.num_layers):
            for kind in ("keys", "values"):
                if past_len:
                    layer = past.layers[i]
                    t = layer.keys if kind == "keys" else layer.values
                    feeds[f"input.past_key_values.layers.{i}.{kind}"] = t.detach().cpu().float().contiguous().numpy()
                else:
                    feeds[f"input.past_key_values.layers.{i}.{kind}"] = np.zeros(
                        (batch, self._kv_heads, 0, self._head_dim), dtype=np.float32)
        outs = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        pairs = [(torch.from_numpy(outs[f"output.past_key_values.layers.{i}.keys"]),
                  torch.from_numpy(outs[f"output.past_key_values.layers.{i}.values"])) for i in range(self.num_layers)]
        return torch.from_numpy(outs["logits"]), pairs

    def _run_shared(self, feeds: dict, past, batch: int, total: int):
        """GroupQueryAttention writes the new keys and values into the cache buffers in place (ONNX Runtime's
        past/present buffer sharing through IO binding): no copy of the cache per step. The buffers hold
        ``capacity`` positions and double when full. A decode step on the cache the previous step returned
        rebinds only the three small inputs and moves each layer's length on by one; that cache object is
        returned again (grown in place, as transformers' `DynamicCache.update` grows its own)."""
        import onnxruntime as ort

        past_len = total - feeds["input_ids"].shape[1]
        bufs = _KVBuffers.of(past)
        follows = bufs is not None and bufs.follows(past)
        if bufs is None or not bufs.holds(past, batch, past_len, follows) or bufs.capacity < total:
            bufs = _KVBuffers(batch, self.num_layers, self._kv_heads, self._head_dim, total, past, past_len, ort)
            follows = False
        binding = bufs.binding(self.session, self.num_layers)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        if isinstance(self._vocab, int):  # a new array each step for the logits, written by the graph
            logits = np.empty((batch, feeds["input_ids"].shape[1], self._vocab), np.float32)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(binding)
        else:
            binding.bind_output("logits", "cpu")  # after a run the binding holds that run's logits, of its shape
            self.session.run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy()
        logits = torch.from_numpy(logits)
        if follows:
            for layer in past.layers:
                layer.length = total
            return logits, past
        return logits, _buffer_cache(bufs, total)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, then set back."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _cache_of(pairs) -> Any:
    """A `DynamicCache` holding ``pairs`` as they are."""
    cache = DynamicCache()
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


class _KVBuffers:
    """Per layer, key and value buffers [batch, kv_heads, capacity, head_dim] as numpy arrays, the OrtValues over
    them (no copy) and torch views of them; filled with the first ``past_len`` positions of ``past``."""

    def __init__(self, batch: int, layers: int, kv_heads: int, head_dim: int, need: int, past, past_len: int, ort):
        self.capacity = max(256, 2 * (-(-need // 256) * 256))
        self.batch = batch
        self.arrays = [np.zeros((batch, kv_heads, self.capacity, head_dim), np.float32) for _ in range(2 * layers)]
        self.tensors = [torch.from_numpy(a) for a in self.arrays]
        for i in range(layers if past_len else 0):
            self.tensors[2 * i][:, :, :past_len] = past.layers[i].keys
            self.tensors[2 * i + 1][:, :, :past_len] = past.layers[i].values
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        self._binding = self._session = None

    @staticmethod
    def of(past) -> Optional["_KVBuffers"]:
        """The buffers ``past`` was made over, if it is a cache this runner returned."""
        layers = getattr(past, "layers", None) or []
        return getattr(layers[0], "bufs", None) if layers else None

    def binding(self, session, layers: int):
        """An IO binding of ``session`` with every layer's buffers bound as its past input and its present output
        (made once per buffers and session; each step rebinds only the token inputs and the logits)."""
        if self._session is not session:
            b = session.io_binding()
            b.bind_output("logits", "cpu")  # output 0
            for i in range(layers):
                for j, kind in enumerate(("keys", "values")):
                    b.bind_ortvalue_input(f"input.past_key_values.layers.{i}.{kind}", self.values[2 * i + j])
                    b.bind_ortvalue_output(f"output.past_key_values.layers.{i}.{kind}", self.values[2 * i + j])
            self._binding, self._session = b, session
        return self._binding

    def follows(self, past) -> bool:
        """Whether every layer of ``past`` still reads these buffers through its length (nothing reassigned)."""
        return past is not None and len(past.layers) * 2 == len(self.tensors) and all(
            getattr(layer, "bufs", None) is self and not layer.own for layer in past.layers)

    def holds(self, past, batch: int, past_len: int, follows: bool) -> bool:
        """Whether ``past``'s first ``past_len`` positions are these buffers' (a crop keeps them; beam search's
        reorders make copies, which do not)."""
        if batch != self.batch or len(past.layers) * 2 != len(self.tensors):
            return False
        if follows:  # (``self.follows(past)``, which the caller has asked already)
            return all(layer.length == past_len for layer in past.layers)
        return all(t is not None and t.data_ptr() == self.tensors[2 * i + j].data_ptr() and t.shape[-2] == past_len
                   for i, layer in enumerate(past.layers) for j, t in enumerate((layer.keys, layer.values)))


class _BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first ``length`` positions of layer ``index``'s shared
    buffers, sliced when read. When transformers assigns keys or values (``crop``, beam search's
    ``reorder_cache``), the layer holds what was assigned from then on (``own``)."""

    def __init__(self, bufs: _KVBuffers, index: int, length: int):
        super().__init__()
        self.own = {}
        self.bufs, self.index, self.length = bufs, index, length
        self.device, self.is_initialized = torch.device("cpu"), True

    def _read(self, j: int, kind: str):
        own = self.__dict__.get("own")
        if own is None or kind in own:
            return (own or {}).get(kind)
        return self.bufs.tensors[2 * self.index + j][:, :, :self.length]

    def _write(self, kind: str, value) -> None:
        self.__dict__.setdefault("own", {})[kind] = value

    keys = property(lambda self: self._read(0, "keys"), lambda self, v: self._write("keys", v))
    values = property(lambda self: self._read(1, "values"), lambda self, v: self._write("values", v))

    def get_seq_length(self) -> int:  # noqa: D102 (no slicing for the common question)
        return super().get_seq_length() if self.own else self.length


def _buffer_cache(bufs: _KVBuffers, length: int):
    """A `DynamicCache` of `_BufferLayer` s over ``bufs``, ``length`` positions long."""
    cache = DynamicCache()
    cache.layers.extend(_BufferLayer(bufs, i, length) for i in range(len(bufs.tensors) // 2))
    return cache
