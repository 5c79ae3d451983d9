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


def _alpha(v: str) -> Optional[float]:
    if v.lower() == "auto":
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number in [0, 1] or 'auto'") from None


PARSERS: dict[str, Callable[[str], Any]] = {"bits": _bits, "group": _group, "int": int, "float": float,
                                            "alpha": _alpha}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per `SparseGPTConfig` field, with its help, choices and type from the field. A flag left out
    leaves no attribute (``argparse.SUPPRESS``): ``config_values`` then knows which flags were given."""
    from dataclasses import MISSING, fields

    from .config import SparseGPTConfig

    groups: dict[Optional[str], Any] = {None: p}
    for f in fields(SparseGPTConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if meta.get("group") not in groups:
            groups[meta["group"]] = p.add_argument_group(meta["group"])
        g = groups[meta.get("group")]
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        helptext = meta["help"]
        if isinstance(default, bool):
            _add_bool(g, f.name, meta.get("flag"), meta.get("negative"), helptext)
        elif isinstance(default, list):
            g.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS, help=helptext)
        else:
            kind = PARSERS.get(meta.get("parse")) or (type(default) if default is not None else str)
            g.add_argument(flag, dest=f.name, type=kind, choices=meta.get("choices"), default=argparse.SUPPRESS,
                           metavar=meta.get("metavar"), help=helptext)


def _add_bool(g: Any, name: str, flag: Optional[str], negative: Optional[str], helptext: str) -> None:
    """``flag`` sets True, ``negative`` False: both (a pair such as --sym / --asym), or one of them."""
    if negative and flag:
        pair = g.add_mutually_exclusive_group()
        pair.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=helptext)
        pair.add_argument(negative, dest=name, action="store_false", default=argparse.SUPPRESS)
    elif negative:
        g.add_argument(negative, dest=name, action="store_false", default=argparse.SUPPRESS, help=helptext)
    else:
        g.add_argument(flag or "--" + name.replace("_", "-"), dest=name, action="store_true", default=argparse.SUPPRESS,
                       help=helptext)


def add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local checkpoint folder, hub name, or 'smollm2-135m' (the built-in default model)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    add_config_args(p)
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


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config of a command line: the defaults, then ``--config FILE``, then every flag given (explicit flags
    win, also when they repeat a default)."""
    from dataclasses import fields

    from .config import SparseGPTConfig

    base = SparseGPTConfig.from_json_file(args.config).to_dict() if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in fields(SparseGPTConfig) if hasattr(args, f.name)}
    return {**base, **given}


def run_compress(args: argparse.Namespace) -> int:
    from .config import SparseGPTConfig
    from .io import check_writable

    config = SparseGPTConfig.from_dict(config_values(args))
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
    q.dataset = config.dataset
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
    from .pipeline.state import resolve_device
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


def all_commands() -> dict[str, tuple[str, Callable, Callable]]:
    """The core's commands and those that live beside it (``export``, ``run``: `sparsegpt_export.converters.cli`)."""
    from .converters.cli import COMMANDS as beside

    return {**COMMANDS, **beside}


def build_parser(prog: str = "sparsegpt-export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="SparseGPT pruning + joint quantization and serving exports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subparsers_by_name = {}  # for `optimum-cli sparsegpt CMD --help`
    for name, (help_, add, run) in all_commands().items():
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
    from .anatomy import UnsupportedModelError
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
