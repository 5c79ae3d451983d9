"""Coverage sweep: every model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, as a tiny random model.

``python -m benchmarks coverage [--only TYPE,...] [--timeout S] [--out DIR]``

Per model type: a tiny random model from its config class (hidden 64, 2 layers, vocabulary 512, 4 heads; per-family
overrides in ``OVERRIDES``), built offline; compressed with ``SparseGPTQuantizer(pattern="2:4", bits=4,
group_size=32)`` on 4 x 16 random tokens; saved, exported to ``sparse24`` (float32, so the export adds no rounding);
loaded back with ``AutoModelForCausalLM.from_pretrained`` (after ``import sparsegpt_export``); its logits compared with
the compressed in-memory model's, and every compressed matrix checked for 2:4 and its 4-bit grid. One row per type:

- ``works``: all of the above hold (``layers`` = matrices compressed / linear layers and expert matrices found);
- ``refused``: sparsegpt-export refused the model before any work (``reason``: the one line a user sees);
- ``skipped``: the tiny model needs a library this machine lacks (``reason``: the ImportError), so nothing was tried;
- ``failed``: anything else (``error``: the exception's type and first line; a check that did not hold; a timeout).

Each type runs in a worker process with a time limit; a crash or hang of one type costs the worker, not the sweep
(the parent starts another). Results: ``coverage.json`` and ``coverage.md`` in ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARK = "@@coverage@@ "
CRASH_ENV = "SPARSEGPT_COVERAGE_CRASH"  # testing aid: the worker dies (as if killed) when asked for this model type
VOCAB = 512
NSAMPLES, SEQLEN = 4, 16

# Common sizes, set on every config that has the attribute (through its attribute_map too).
COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 16, "max_position_embeddings": 256,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 64, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "ffn_dim": 128, "d_ff": 128, "n_inner": 128,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "n_group": 1, "topk_group": 1, "index_head_dim": 16, "index_n_heads": 4,
    "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2, "vocab_size_per_layer_input": VOCAB,
    "num_kv_shared_layers": 0, "o_lora_rank": 32, "first_dense_intermediate_size": 128,
    "shared_intermediate_size": 64, "unpadded_vocab_size": VOCAB, "hidden_size_global": 64, "ffn_hidden_size": 128,
    "expert_ffn_hidden_size": 64, "encoder_hash_byte_group_vocab": VOCAB, "dff": 128,
    "decoder_ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_attention_heads": 4, "encoder_attention_heads": 4,
    "shared_expert_intermediate_size": 64, "intermediate_size_mlp": 128,
}
DROP = object()  # an override that removes a COMMON key
# Dots 3: heads per layer kind (multi-head latent attention needs as many key/value heads as heads, and the sliding
# layers' head_dim = qk_nope_head_dim + qk_rope_head_dim)
DOTS3 = {"num_key_value_heads": 4, "num_attention_heads": 4,
         "per_layer_config": {"01": {"num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
                                     "qk_nope_head_dim": 8, "head_dim": 16}}}
QWEN4_EXP = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
             "indexer_compress_ratio": 4}  # the indexer has no defaults
# Per-family overrides on top of COMMON (model_type -> config kwargs), and calls a family needs after building.
OVERRIDES: dict[str, dict[str, Any]] = {
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
    "prophetnet": {"num_hidden_layers": DROP, "num_encoder_layers": 2, "num_decoder_layers": 2},
    "xlnet": {"max_position_embeddings": DROP, "d_head": 16},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "zaya": {"num_experts_per_tok": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dots3_note": DOTS3,
    "dots3_note_text": DOTS3,
    "qwen4_exp": QWEN4_EXP,
    "qwen4_exp_text": QWEN4_EXP,
    "cpmant": {"dim_ff": 128},
    "nemotron_h": {"layers_block_type": ["linear_attention", "full_attention"]},
    "roc_bert": {"shape_vocab_size": VOCAB, "pronunciation_vocab_size": VOCAB},
    "dbrx": {"d_model": 64, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}, "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2, "hidden_size": 64}},
    "kolibri1_1": {"kv_source_layers": [0, 1], "index_layers": [1], "mlp_only_layers": [0], "index_num_heads": 2},
    "musicgen": {"num_codebooks": 1},
    "musicgen_melody": {"num_codebooks": 1},
}
AFTER_BUILD: dict[str, Callable[[Any], None]] = {
    "xmod": lambda m: m.set_default_language("en_XX"),
}
MAX_PARAMETERS = 20_000_000  # a "tiny" model above this has a config key COMMON missed: an override is due


# ---------------------------------------------------------------------------------------------- building
def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(model_type: str) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _settable(cfg: Any, key: str) -> bool:
    if isinstance(inspect.getattr_static(type(cfg), key, None), property):
        return False  # derived (Falcon's head_dim, ...)
    try:
        return hasattr(cfg, key) or key in getattr(cfg, "attribute_map", {})
    except Exception:  # noqa: BLE001  (per-layer attributes of some configs raise on access)
        return False


def _per_layer(defaults: Any, extra: dict[str, Any]) -> dict[str, list]:
    """Lists with one entry per layer, cut to two layers: the first, and the first of another kind when
    ``layer_types`` has several (a hybrid keeps one layer of each kind)."""
    d = defaults.to_dict()
    n = d.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 2:
        return {}
    kinds = d.get("layer_types")
    pick = [0, 1]
    if isinstance(kinds, list) and len(kinds) == n:
        pick = [0, next((i for i, t in enumerate(kinds) if t != kinds[0]), 1)]
    out = {k: [v[i] for i in pick] for k, v in d.items() if isinstance(v, list) and len(v) == n}
    for k, v in out.items():  # per-layer sizes (Gemma 3n's intermediate_size) get COMMON's size too
        if isinstance(COMMON.get(k), int) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out[k] = [COMMON[k]] * len(v)
    special = d.get("per_layer_config")
    if isinstance(special, dict) and special:  # Gemma 4: overrides of some layers; the first becomes layer 1
        first = special[sorted(special)[0]]
        out["per_layer_config"] = {"01": {k: extra.get(k, COMMON.get(k, v)) for k, v in first.items()}}
    return out


def _sized(defaults: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of COMMON (and ``extra``) that ``defaults`` (a config instance) has."""
    kw = {k: v for k, v in COMMON.items() if _settable(defaults, k)}
    if _settable(defaults, "qk_rope_head_dim"):  # multi-head latent attention: head_dim is the rope part, kv heads
        kw["head_dim"] = COMMON["qk_rope_head_dim"]  # as many as heads
        kw["num_key_value_heads"] = COMMON["num_attention_heads"]
    kw.update(_per_layer(defaults, extra))
    kw.update(extra)
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = getattr(defaults, tok, None)
        if isinstance(v, int) and v >= VOCAB:
            kw[tok] = min(v, 2)
        elif isinstance(v, list) and any(isinstance(x, int) and x >= VOCAB for x in v):
            kw[tok] = [2]
    return {k: v for k, v in kw.items() if v is not DROP}


def tiny_config(model_type: str):
    """A tiny config of the causal LM class of ``model_type`` (sub-configs of a composite config sized too)."""
    cls = model_class(model_type).config_class
    defaults = cls()
    subs = {}
    for key in getattr(defaults, "sub_configs", None) or ("text_config", "decoder", "language_config", "llm_config"):
        sub = getattr(defaults, key, None)
        if sub is not None and hasattr(sub, "to_dict") and key not in OVERRIDES.get(model_type, {}) and _sized(sub, {}):
            subs[key] = {**sub.to_dict(), **_sized(sub, {})}
    return cls(**_sized(defaults, dict(OVERRIDES.get(model_type, {}))), **subs)


def build(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(model_type)
    model = model_class(model_type)._from_config(cfg, dtype=torch.float32)
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    return model.eval()


def calibration(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- one family
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _check_matrices(model, records: dict, fused: dict, params: dict) -> Optional[str]:
    """None when every compressed matrix of the loaded ``model`` is 2:4 and on its 4-bit grid; else what is not."""
    from sparsegpt_export.anatomy import get_weight
    from sparsegpt_export.solver import expand_groups

    items = [(n, get_weight(model.get_submodule(n)).float(), r) for n, r in records.items()]
    items += [(n, w, r) for n, (w, r) in _fused_matrices(model, fused, params).items()]
    for name, w, rec in items:
        if rec.pattern == "2:4" and not bool((w.reshape(w.shape[0], -1, 4).ne(0).sum(-1) <= 2).all()):
            return f"{name}: not 2:4 after the round trip"
        if rec.bits and rec.scales is not None:
            s, z = expand_groups(rec.scales.float(), torch.full_like(rec.scales.float(), 8.0), w.shape[1],
                                 rec.group_size)
            q = w / s
            if not bool(((q - q.round()).abs() <= 1e-3).all() and (q.round().abs() <= 8).all()):
                return f"{name}: a weight off its {rec.bits}-bit grid after the round trip"
    return None


def _fused_matrices(model, fused: dict, params: dict) -> dict:
    """Each fused expert matrix ``<param>.<e>`` of ``model`` as [out, in] (``params``: report["moe"]["params"]),
    with its record."""
    out = {}
    for name, rec in fused.items():
        param, _, e = name.rpartition(".")
        p = model.get_parameter(param)[int(e)]
        out[name] = (p.t() if params[param]["transposed"] else p).float(), rec
    return out


def count_matrices(model) -> Optional[int]:
    """The linear layers (and fused expert matrices) in the model's blocks, counted before compression."""
    from sparsegpt_export import moe
    from sparsegpt_export.anatomy import UnsupportedModelError, block_linears, find_blocks

    try:
        _, blocks = find_blocks(model)
    except UnsupportedModelError:
        return None
    return sum(len(block_linears(b)) + moe.count_fused_matrices(b) for b in blocks)


def run_family(model_type: str, work: Path) -> dict[str, Any]:
    """One row of the sweep (never raises)."""
    import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)
    from sparsegpt_export import SparseGPTQuantizer, UnsupportedModelError
    from sparsegpt_export.families import check_config

    t0 = time.perf_counter()
    row: dict[str, Any] = {"model_type": model_type}
    try:  # a refused family is refused on its config, as from_pretrained would (before the weights are read)
        try:
            cfg = model_class(model_type).config_class()
        except Exception:  # noqa: BLE001  (no valid defaults: what a checkpoint's config.json names is its type)
            cfg = SimpleNamespace(model_type=model_type)
        check_config(cfg, model_class(model_type).__name__)
    except UnsupportedModelError as e:
        return {**row, "class": model_class(model_type).__name__, "status": "refused", "reason": str(e)}
    except Exception:  # noqa: BLE001  (a config class without defaults: the tiny build below decides)
        pass
    try:
        model = build(model_type)
        row["class"] = type(model).__name__
        row["parameters"] = sum(p.numel() for p in model.parameters())
        if row["parameters"] > MAX_PARAMETERS:
            return {**row, "status": "failed", "stage": "build",
                    "error": f"the tiny config has {row['parameters']} parameters (> {MAX_PARAMETERS}): add an override"}
        found = count_matrices(model)
        _logits(model, calibration()[:1])  # the tiny model must run as built (a bad override fails here, not later)
    except ImportError as e:  # an optional library of the family (gemma3n's vision tower: timm) is not installed
        return {**row, "status": "skipped", "stage": "build", "reason": f"not installed here: {_short(e)}"}
    except Exception as e:  # noqa: BLE001  (the sweep records any failure)
        return {**row, "status": "failed", "stage": "build", "error": _short(e)}
    try:
        q = SparseGPTQuantizer(pattern="2:4", bits=4, group_size=32, dataset=calibration(), nsamples=NSAMPLES,
                               seqlen=SEQLEN)
        q.quantize_model(model, progress=False)
    except UnsupportedModelError as e:  # a refusal by the family rules names the model type; anything else failed
        msg = str(e).splitlines()[0]
        if msg.startswith("model type "):
            return {**row, "status": "refused", "reason": msg}
        return {**row, "status": "failed", "stage": "compress", "error": f"UnsupportedModelError: {msg}"}
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "failed", "stage": "compress", "error": _short(e), "trace": _where(e)}
    row.update(_summary(q.report))
    row["linear_layers_found"] = found
    try:
        row.update(_round_trip(model, q, work))
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "failed", "stage": "export/load", "error": _short(e), "trace": _where(e)}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _summary(report: dict) -> dict[str, Any]:
    s = report["summary"]
    out = {"layers_compressed": s["layers_compressed"], "layers_left_dense": s["layers_skipped"],
           "routers_left_dense": len(report.get("moe", {}).get("routers_left_dense", [])), "weighted_sparsity": round(s["weighted_sparsity"], 4)}
    if report.get("moe"):
        out["experts"] = len(report["moe"]["experts"])
        out["expert_fallbacks"] = sum(1 for x in report["moe"]["experts"] if x["hessian"] != "routed")
    return out


def _round_trip(model, q, work: Path) -> dict[str, Any]:
    from sparsegpt_export.converters import sparse24

    ids = calibration(seed=2)[:2]
    ref = _logits(model, ids)
    comp, s24 = work / "compressed", work / "sparse24"
    q.save(model, comp, overwrite=True)
    sparse24.export(comp, s24, dtype="float32", overwrite=True)
    loaded = type(model).from_pretrained(str(s24)).eval()
    got = _logits(loaded, ids)
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    bad = _check_matrices(loaded, q.result.records, q.result.expert_records, q.report.get("moe", {}).get("params", {}))
    status = "works" if err <= 1e-4 and bad is None else "failed"
    row = {"status": status, "logits_rel_max_diff": err}
    if bad is not None:
        row["error"] = bad
    elif err > 1e-4:
        row["error"] = f"logits of the loaded export differ from the compress output (max rel {err:.3g})"
    return row


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb[-4:]))


# ---------------------------------------------------------------------------------------------- the worker
def worker() -> int:
    """Reads model types from stdin, one a line; writes one result line (``MARK`` + JSON) per type."""
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for line in sys.stdin:
        mt = line.strip()
        if not mt:
            continue
        if os.environ.get(CRASH_ENV) == mt:
            os._exit(3)
        with tempfile.TemporaryDirectory(prefix=f"coverage-{mt}-") as tmp:
            row = run_family(mt, Path(tmp))
        sys.stdout.write(MARK + json.dumps(row) + "\n")
        sys.stdout.flush()
    return 0


class _Worker:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.coverage", "--worker"], cwd=str(ROOT),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env)
        self.buf = b""

    def _line(self, deadline: float) -> Optional[bytes]:
        """The worker's next output line; None at the deadline, b"" when it exited."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def ask(self, model_type: str, timeout: float) -> dict[str, Any]:
        self.proc.stdin.write(model_type.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line is None:
                self.close()
                return {"model_type": model_type, "status": "failed", "stage": "timeout",
                        "error": f"no result within {timeout:.0f} s (the worker was stopped)"}
            if not line:
                code = self.proc.wait()
                return {"model_type": model_type, "status": "failed", "stage": "crash",
                        "error": f"the worker process died (exit code {code})"}
            text = line.decode(errors="replace")
            if text.startswith(MARK):
                return json.loads(text[len(MARK):])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sweep(types: list[str], timeout: float, log=print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    w: Optional[_Worker] = None
    try:
        for i, mt in enumerate(types):
            if w is None or not w.alive():
                w = _Worker()
            t0 = time.monotonic()
            row = w.ask(mt, timeout)
            row.setdefault("wall_s", round(time.monotonic() - t0, 2))
            rows.append(row)
            log(f"[{i + 1}/{len(types)}] {mt} ({row['wall_s']:.0f} s): {row['status']} "
                f"{row.get('reason') or row.get('error') or _layers(row)}", flush=True)
    finally:
        if w is not None:
            w.close()
    return rows


def _layers(row: dict) -> str:
    return f"{row.get('layers_compressed')}/{row.get('linear_layers_found')}"


# ---------------------------------------------------------------------------------------------- results
def decoder_only_with_linears(row: dict) -> bool:
    """The rows the >= 90% bar counts: everything but refusals and families this machine cannot build."""
    return row["status"] not in ("refused", "skipped")


def totals(rows: list[dict]) -> dict[str, Any]:
    counted = [r for r in rows if decoder_only_with_linears(r)]
    works = sum(r["status"] == "works" for r in counted)
    return {"model_types": len(rows), "works": works, "refused": sum(r["status"] == "refused" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "skipped": sum(r["status"] == "skipped" for r in rows),
            "works_share_of_compressible": round(works / len(counted), 4) if counted else 0.0}


def markdown(rows: list[dict], meta: dict) -> list[str]:
    t = meta["totals"]
    lines = [f"# Coverage sweep: transformers {meta['transformers']} (torch {meta['torch']})", "",
             f"`{meta['command']}`: {t['model_types']} model types; works {t['works']}, refused {t['refused']}, "
             f"failed {t['failed']}, skipped (a library not installed) {t.get('skipped', 0)}; works / (works + failed) "
             f"= {100 * t['works_share_of_compressible']:.1f}%", "",
             "| model type | class | result | layers compressed / found | detail |", "|---|---|---|---|---|"]
    for r in rows:
        detail = r.get("reason") or r.get("error") or _works_detail(r)
        layers = _layers(r) if "layers_compressed" in r else ""
        lines.append(f"| {r['model_type']} | {r.get('class', '')} | {r['status']} | {layers} | "
                     f"{str(detail).replace('|', '/')} |")
    return lines


def _works_detail(r: dict) -> str:
    parts = [f"logits max rel diff {r['logits_rel_max_diff']:.1e}"]
    if r.get("experts"):
        parts.append(f"{r['experts']} expert matrices ({r['expert_fallbacks']} on the fallback Hessian)")
    if r.get("routers_left_dense"):
        parts.append(f"{r['routers_left_dense']} routers dense")
    if r.get("layers_left_dense"):
        parts.append(f"{r['layers_left_dense']} layers never called, dense")
    return "; ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks coverage")
    ap.add_argument("--only", default=None, help="comma-separated model types (default: all causal LM types)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per model type (default 240)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    ap.add_argument("--name", default="coverage", help="file name stem of the results (default coverage)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    import transformers

    types = causal_lm_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            print(f"python -m benchmarks coverage: error: --only: {unknown} not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                  file=sys.stderr)
            return 2
        types = wanted
    t0 = time.time()
    rows = sweep(types, args.timeout)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "command": "python -m benchmarks coverage" + (f" --only {args.only}" if args.only else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)), "wall_s": round(time.time() - t0, 1),
            "timeout_s": args.timeout, "totals": totals(rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(markdown(rows, meta)) + "\n")
    print("\n".join(markdown(rows, meta)[:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
