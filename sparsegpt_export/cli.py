"""``sparsegpt-export``: compress, evaluate (and, through the converters, export) from the command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

EXIT_USAGE = 2


def _bits(v: str) -> Optional[int]:
    if v.lower() in ("none", "0", "16", "32", "no"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits: {v!r} is not an integer 2..8 or 'none'") from None


def _group(v: str) -> Optional[int]:
    if v.lower() in ("none", "-1", "channel", "per-channel"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size: {v!r} is not an integer or -1 (per channel)") from None


def _rows(v: str) -> tuple[int, int]:
    try:
        a, b = v.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows: {v!r} is not START:END") from None


def add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local checkpoint folder, hub name, or 'smollm2-135m' (the built-in default model)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--pattern", default="2:4", help="2:4, 4:8, any N:M (N kept of M), unstructured, or dense (default 2:4)")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (default 0.5)")
    p.add_argument("--bits", type=_bits, default=4, help="joint quantization bits 2..8, or 'none' (default 4)")
    p.add_argument("--group-size", type=_group, default=128, help="quantization group size, or -1 per channel (default 128)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    g.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    p.add_argument("--dataset", default="c4", help="c4, wikitext2, ptb, or a .txt/.jsonl/.parquet/.safetensors file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of mean(diag H) (default 0.01)")
    p.add_argument("--blocksize", type=int, default=128, help="lazy-update block size B (default 128)")
    p.add_argument("--mask-blocksize", type=int, default=128, help="adaptive mask block Bs, unstructured (default 128)")
    p.add_argument("--hessian-dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--calib-batch-size", type=int, default=None, help="windows per block forward (default: all that fit)")
    p.add_argument("--targets", action="append", default=[], help="regex of module names to compress (repeatable)")
    p.add_argument("--ignore", action="append", default=[], help="regex of module names to leave alone (repeatable)")
    p.add_argument("--on-incompatible", choices=["skip", "error"], default="skip",
                   help="a layer whose columns are not a multiple of M: skip it with a warning (default) or fail")
    p.add_argument("--no-fit-scales", dest="fit_scales_to_kept", action="store_false",
                   help="fit each group's grid to all its weights instead of only the kept ones")
    p.add_argument("--no-clip-search", dest="clip_search", action="store_false", help="plain min/max grid, no clipping search")
    p.add_argument("--no-refit-scales", dest="refit_scales", action="store_false",
                   help="keep the scales chosen during the sweep instead of refitting them to the final codes")
    p.add_argument("--no-stack-shared-inputs", dest="stack_shared_inputs", action="store_false",
                   help="solve q/k/v and gate/up one layer at a time instead of in one sweep over their stacked rows")
    p.add_argument("--quant-order", choices=["after-mask", "joint"], default="after-mask",
                   help="with --bits and pruning: choose the mask first, then quantize on it in a second sweep "
                        "(after-mask, default), or mask and quantize in one sweep (joint)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the lm_head to --bits (not pruned; a tied one is untied from the embedding)")
    p.add_argument("--smooth-alpha", type=float, default=0.0, metavar="ALPHA",
                   help="activation smoothing before compression, migration strength in (0, 1] (default 0: off); "
                        "for graphs that quantize activations, e.g. ONNX at accuracy_level 4 (0.6 measured on SmolLM2)")
    p.add_argument("--smooth-lm-head-alpha", type=float, default=None, metavar="ALPHA",
                   help="with --quantize-lm-head: migration strength for the final norm -> lm_head pair "
                        "(default: half of --smooth-alpha, 0.3 measured best on SmolLM2 for 0.6; 0: that pair unsmoothed)")
    p.add_argument("--scale-dtype", choices=["float16", "bfloat16", "float32"], default=None)
    a = p.add_argument_group("mixed sparsity and the weight update (issue #7)")
    a.add_argument("--allocation", choices=["uniform", "sensitivity", "owl"], default="uniform",
                   help="per-matrix sparsity for unstructured pruning; the parameter-weighted average stays --sparsity")
    a.add_argument("--sensitivity", choices=["hutchinson", "fisher", "obd", "proxy"], default="obd",
                   help="sensitivity score: mean OBD saliency F_ii w_i^2 of the matrix (obd, default), loss-Hessian "
                        "trace by Hutchinson probes, squared gradients (fisher), or trace(H_layer) x ||W||^2 (proxy, "
                        "no backward)")
    a.add_argument("--probes", type=int, default=32, help="Hutchinson probes / Fisher and OBD windows (default 32)")
    a.add_argument("--alpha", type=float, default=0.1, help="sensitivity allocation: density 1-p +- alpha (default 0.1)")
    a.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: sparsity spread +- lambda (default 0.08)")
    a.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold, x the block mean (default 5)")
    a.add_argument("--sensitivity-cache", default=None,
                   help="JSON file for the scores (default: sparsegpt-sensitivity.json beside --out)")
    a.add_argument("--dense-fraction", type=float, default=0.0,
                   help="N:M: keep the most sensitive fraction of the linear layers dense (e.g. 0.1)")
    a.add_argument("--mix-pattern", default=None, help="N:M: a second pattern for the most sensitive layers (e.g. 4:8)")
    a.add_argument("--mix-fraction", type=float, default=0.0, help="N:M: fraction of the layers that get --mix-pattern")
    a.add_argument("--saliency", choices=["obs", "isc"], default="obs",
                   help="which weights to drop: SparseGPT's w^2/[H^-1]^2 (obs) or Shao et al.'s isc")
    a.add_argument("--update", choices=["obs", "admm"], default="obs",
                   help="weight update: SparseGPT's sweep (obs) or least squares on the mask by ADMM")
    a.add_argument("--refine-steps", type=int, default=40, help="ADMM iterations (default 40)")
    a.add_argument("--admm-mask", choices=["gradual", "obs"], default="gradual",
                   help="ADMM: choose the mask gradually during the iterations (default) or keep the sweep's")
    p.add_argument("--dtype", default="auto", help="dtype to load the model in (default: the checkpoint's)")
    p.add_argument("--config", default=None, help="a sparsegpt_config.json to start from (flags given override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--offload", choices=["none", "cpu", "disk"], default="cpu",
                   help="where the model waits between blocks: cpu (host memory, default), none (all on the compute "
                        "device), disk (streamed block by block from its safetensors files: for models larger than memory)")
    p.add_argument("--offload-dir", default=None,
                   help="--offload disk: where finished blocks are staged, and the resume checkpoint kept (default: beside --out)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="what the calibration activations may take on the compute device (e.g. 20GiB); beyond it they "
                        "stay in host memory and go to the device chunk by chunk")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective (default 1800)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


_CONFIG_KEYS = ("pattern", "sparsity", "bits", "group_size", "sym", "damp", "blocksize", "mask_blocksize",
                "hessian_dtype", "fit_scales_to_kept", "clip_search", "refit_scales", "stack_shared_inputs", "quantize_lm_head", "scale_dtype", "targets", "ignore",
                "allocation", "sensitivity", "probes", "alpha", "owl_lambda", "owl_m", "sensitivity_cache",
                "dense_fraction", "mix_pattern", "mix_fraction", "saliency", "update", "refine_steps", "admm_mask", "quant_order", "smooth_alpha",
                "smooth_lm_head_alpha",
                "on_incompatible", "dataset", "nsamples", "seqlen", "seed", "calib_batch_size", "device")


def run_compress(args: argparse.Namespace) -> int:
    from .config import SparseGPTConfig
    from .io import check_writable
    from .quantizer import SparseGPTQuantizer

    values = {k: getattr(args, k) for k in _CONFIG_KEYS}
    if args.config:
        base = SparseGPTConfig.from_json_file(args.config).to_dict()
        # flags left at their defaults do not override the file
        parser_defaults = _compress_defaults()
        values = {**base, **{k: v for k, v in values.items() if v != parser_defaults.get(k)}}
    config = SparseGPTConfig.from_dict(values)
    if args.offload == "disk":
        # before anything large is built (see sparsegpt_export.hostmem; from_pretrained does it too, for the API)
        from . import hostmem

        hostmem.returns_memory()
    check_writable(args.out, overwrite=args.overwrite or args.resume)
    if args.offload_dir:
        from .offload import check_dir

        check_dir(args.offload_dir)
    if args.max_memory:
        from .offload import parse_memory

        parse_memory(args.max_memory)
    from . import distributed

    d = distributed.init(config.device, timeout_s=args.dist_timeout)
    try:
        return _compress(args, config, d)
    finally:
        distributed.shutdown()


def _compress(args: argparse.Namespace, config: Any, d: Any) -> int:
    from .quantizer import SparseGPTQuantizer

    t0 = time.perf_counter()
    q = SparseGPTQuantizer.from_pretrained(args.model, config=config, dtype=None if args.dtype == "auto" else args.dtype,
                                           offload=args.offload, offload_dir=args.offload_dir, max_memory=args.max_memory)
    q.dataset = args.dataset
    t_load = time.perf_counter() - t0
    out = q.quantize(args.out, overwrite=args.overwrite or args.resume, progress=args.progress, resume=args.resume)
    s = q.report["summary"]
    if d is not None and not d.is_main:
        return 0
    print(
        f"compressed {s['layers_compressed']} layers ({s['layers_skipped']} skipped) of {args.model} to "
        f"{config.pattern}{'' if config.bits is None else f' + {config.bits}-bit'}: sparsity {s['weighted_sparsity']:.4f}, "
        f"mean relative error {s['mean_rel_error']:.4g}; load {t_load:.1f} s, compress {s['wall_s']:.1f} s, "
        f"total {time.perf_counter() - t0:.1f} s -> {out}"
    )
    for w in q.report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _compress_defaults() -> dict[str, Any]:
    p = argparse.ArgumentParser()
    add_compress_args(p)
    return vars(p.parse_args(["m", "--out", "o"]))


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint folder (e.g. the output of compress), hub name or 'smollm2-135m'")
    p.add_argument("--dataset", required=True, help="wikitext2, c4, ptb, or a .txt/.jsonl/.parquet file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    p.add_argument("--rows", type=_rows, default=None, help="START:END rows of a .jsonl/.parquet file (e.g. 1000:2000)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run_eval(args: argparse.Namespace) -> int:
    from .calibration import load_eval_text
    from .driver import resolve_device
    from .evaluation import perplexity
    from .models import load_model

    model, tok = load_model(args.model, dtype=None if args.dtype == "auto" else args.dtype)
    dev = resolve_device(args.device)
    model.to(dev)
    text = load_eval_text(args.dataset, args.rows)
    r = perplexity(model, tok, text, seqlen=args.seqlen, windows=args.windows, device=str(dev), progress=args.progress)
    r.update(model=args.model, dataset=str(args.dataset))
    print(f"perplexity {r['ppl']:.4f} on {args.dataset} ({r['windows']} windows x {r['seqlen']} tokens)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the output folder of compress (it holds sparsegpt_report.json)")
    p.add_argument("--out", default=None, help="PNG file to write (default: DIR/sparsity.png)")


def run_plot(args: argparse.Namespace) -> int:
    from .plots import plot_sparsity

    print(f"wrote {plot_sparsity(args.model, args.out)}")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "compress": ("prune (and quantize) a causal LM with SparseGPT", add_compress_args, run_compress),
    "eval": ("perplexity with the SparseGPT/GPTQ protocol", add_eval_args, run_eval),
    "plot-sparsity": ("draw each layer's sparsity and sensitivity score (PNG)", add_plot_args, run_plot),
}


def register_extra_commands() -> None:
    """Commands that live beside the core (export, run) register themselves here when importable."""
    from .converters import cli as conv_cli  # noqa: F401


def build_parser(prog: str = "sparsegpt-export") -> argparse.ArgumentParser:
    register_extra_commands()
    parser = argparse.ArgumentParser(prog=prog, description="SparseGPT pruning + joint quantization and serving exports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subparsers_by_name = {}  # for `optimum-cli sparsegpt CMD --help`
    for name, (help_, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=run)
        parser.subparsers_by_name[name] = p
    return parser


def torch_oom() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def handle_errors(fn: Callable[[], int]) -> int:
    from .calibration import CalibrationError
    from .config import ConfigError
    from .distributed import DistributedError
    from .offload import OffloadError
    from .driver import UnsupportedModelError
    from .io import OutputError
    from .models import ModelNotFoundError
    from .solver import SolverError

    try:
        return fn()
    except KeyboardInterrupt:
        print("sparsegpt-export: interrupted; nothing was written to --out (rerun with --resume to continue)", file=sys.stderr)
        return 130
    except (ConfigError, CalibrationError, UnsupportedModelError, OutputError, ModelNotFoundError, SolverError,
            DistributedError, OffloadError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"sparsegpt-export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, torch_oom()) as e:
        import os

        rank = f" on rank {os.environ['RANK']}" if "RANK" in os.environ else ""
        print(f"sparsegpt-export: error: out of memory{rank} ({str(e).splitlines()[0][:200] if str(e) else 'host'}); "
              "lower --calib-batch-size, --nsamples or --seqlen, or use --offload. Nothing was written to --out; the "
              "last finished block is kept: rerun with --resume", file=sys.stderr)
        return 1


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return handle_errors(lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
