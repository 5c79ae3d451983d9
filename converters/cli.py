"""``sparsegpt-export export DIR --format F --out OUT`` and ``run``: the commands that live beside the core, in
`COMMANDS`, which the core CLI (`sparsegpt_export.cli`) adds to its own.

A format is one entry of `FORMATS`: its help line and the module whose ``export(src, out, dtype, overwrite)``
writes it (imported only when chosen, so the CLI starts fast).
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from typing import Callable

FORMATS: dict[str, tuple[str, str]] = {
    "sparse24": ("packed N:M codes + positions + scales in one safetensors file (our compact format)",
                 "sparsegpt_export.converters.sparse24"),
    "compressed-tensors": ("W4A16 pack-quantized for vLLM and transformers (symmetric 4-bit only; pattern in "
                           "sparsity.json)", "sparsegpt_export.converters.compressed_tensors"),
    "dense": ("plain dense Hugging Face checkpoint (zeros kept) in the chosen dtype", "sparsegpt_export.converters.dense"),
    "onnx": ("ONNX generation graph with a KV cache for ONNX Runtime; 4-bit layers as MatMulNBits (or QDQ) built "
             "from the stored codes", "sparsegpt_export.converters.onnx"),
}


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the output folder of `sparsegpt-export compress`")
    p.add_argument("--format", required=True, help="; ".join(f"{k}: {h}" for k, (h, _) in FORMATS.items()))
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype of the stored values (default: the model's, float16 when that is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--onnx-quant", choices=["matmulnbits", "qdq", "none"], default="matmulnbits",
                   help="onnx: 4-bit layers as com.microsoft.MatMulNBits (default), as opset-21 INT4 "
                        "DequantizeLinear + MatMul (qdq), or a float32 graph (none)")
    p.add_argument("--accuracy-level", type=_accuracy_level, default="auto", metavar="{auto,0,1,2,3,4}",
                   help="onnx: MatMulNBits accuracy_level. auto (default): 4 (int8 activations per 32 columns on CPU, the "
                        "fastest) "
                        "when the model was smoothed (compress --smooth-alpha; its default with --bits on Llama-style "
                        "models), which keeps level 4 close to torch; "
                        "otherwise 1 (float compute, as accurate as the float graph); 0-4: that level")
    p.add_argument("--ort-fusions", choices=["cpu", "cuda"], default=None,
                   help="onnx: fuse norms, rotary embeddings (and attention where matched) into ONNX Runtime's own "
                        "ops for that provider; the graph then runs on ONNX Runtime only (traced graph)")
    p.add_argument("--onnx-graph", choices=["auto", "gqa", "traced"], default="auto",
                   help="onnx: gqa = the decoder written with ONNX Runtime's fused operators (GroupQueryAttention over "
                        "the cache, RMSNorm, rotary; Llama, Mistral, Qwen2); traced = torch.onnx.export of the "
                        "transformers code (any architecture). auto (default): gqa where it applies, except with "
                        "--onnx-quant qdq or --ort-fusions")


def _accuracy_level(text: str):
    """``--accuracy-level``: 'auto' or an integer 0-4."""
    if text == "auto":
        return text
    if text not in {"0", "1", "2", "3", "4"}:
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, 0, 1, 2, 3 or 4")
    return int(text)


def run_export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: unknown; choose one of {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[args.format][1])
    extra = {}
    if args.format == "onnx":
        extra = {"onnx_quant": args.onnx_quant, "accuracy_level": args.accuracy_level, "ort_fusions": args.ort_fusions,
                 "onnx_graph": args.onnx_graph}
    elif (args.onnx_quant != "matmulnbits" or args.accuracy_level != "auto" or args.ort_fusions
          or args.onnx_graph != "auto"):
        raise ValueError("--onnx-quant/--accuracy-level/--ort-fusions/--onnx-graph: apply to --format onnx only, "
                         f"not {args.format}")
    out = module.export(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, **extra)
    files = [f for f in Path(out).rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    print(f"exported {args.model} as {args.format} to {out}: {total} bytes written in {len(files)} files")
    return 0


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the output folder of `sparsegpt-export export --format onnx`")
    p.add_argument("--prompt", required=True, action="append", help="text to continue (repeatable: a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


def run_run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import AutoTokenizer

    from sparsegpt_export.onnx import OnnxCausalLM

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    model = OnnxCausalLM.from_pretrained(args.model, num_threads=args.threads)
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{args.model}: no tokenizer beside the graph ({e})") from None
    prompts = args.prompt
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature if args.do_sample else None,
                         top_p=args.top_p if args.do_sample else None, pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    for text in tok.batch_decode(new, skip_special_tokens=True):
        print(text)
    print(f"[{new.numel()} tokens in {dt:.2f} s]")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "export": (f"convert a compress output to a serving format ({', '.join(FORMATS)})", add_export_args, run_export),
    "run": ("generate text with an ONNX export (quick look)", add_run_args, run_run),
}
