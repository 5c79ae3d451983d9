"""``sparsegpt-export export DIR --format F --out OUT``: registered into the core CLI when this package imports.

A format is one entry of `FORMATS`: its help line and the module whose ``export(src, out, dtype, overwrite)``
writes it (imported only when chosen, so the CLI starts fast).
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from sparsegpt_export.cli import COMMANDS

FORMATS: dict[str, tuple[str, str]] = {
    "sparse24": ("packed N:M codes + positions + scales in one safetensors file (our compact format)",
                 "sparsegpt_export.converters.sparse24"),
    "compressed-tensors": ("W4A16 pack-quantized for vLLM and transformers (symmetric 4-bit only; pattern in "
                           "sparsity.json)", "sparsegpt_export.converters.compressed_tensors"),
    "dense": ("plain dense Hugging Face checkpoint (zeros kept) in the chosen dtype", "sparsegpt_export.converters.dense"),
}


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the output folder of `sparsegpt-export compress`")
    p.add_argument("--format", required=True, help="; ".join(f"{k}: {h}" for k, (h, _) in FORMATS.items()))
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of the stored values (default: the model's, float16 when that is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: unknown; choose one of {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[args.format][1])
    out = module.export(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    files = [f for f in Path(out).rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    print(f"exported {args.model} as {args.format} to {out}: {total} bytes written in {len(files)} files")
    return 0


COMMANDS["export"] = (f"convert a compress output to a serving format ({', '.join(FORMATS)})", add_export_args, run_export)
