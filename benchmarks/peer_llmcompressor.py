"""The peer side of the compress suite: the same pass by llmcompressor, run in llmcompressor's own virtual environment.

This script imports nothing from ``sparsegpt_export`` (it runs under the peer's Python, which need not have it):

    VENV/bin/python benchmarks/peer_llmcompressor.py --model DIR --calib FILE.safetensors --nsamples 128 \\
        --seqlen 512 --recipe sparsegpt-2:4 --out OUT [--device cpu|cuda]

``--recipe``: ``sparsegpt-2:4`` (``SparseGPTModifier(sparsity=0.5, mask_structure="2:4")``) or
``sparsegpt-2:4+gptq-w4a16`` (the same, then ``GPTQModifier(scheme="W4A16")``: int4 symmetric, groups of
``--group-size``, default 128, the preset's; ``--bypass-divisibility`` lets it run where the group does not divide
the columns). Every linear layer of the blocks is a target, ``lm_head`` is
ignored, as in our defaults. The calibration is the ``input_ids`` tensor of ``--calib`` (its first
``--nsamples`` rows, unshuffled), the very tokens our side gets.

Writes ``OUT/`` as a plain float checkpoint (the weights after the pass, quantized ones dequantized as
llmcompressor leaves them in the module, quantization parameters dropped), so that the suite evaluates both
tools' outputs with the same code, and ``OUT/peer_result.json``: wall time of the whole run (load, pass, write),
of ``oneshot`` alone, the process's peak resident memory, peak GPU memory on CUDA, and the versions. A pass that
raises writes ``{"failed": "<the error>"}`` there instead and exits 3, so the suite can report the failure.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help=".safetensors file holding input_ids [n, seqlen]")
    ap.add_argument("--nsamples", type=int, required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--recipe", required=True, choices=["sparsegpt-2:4", "sparsegpt-2:4+gptq-w4a16"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bypass-divisibility", action="store_true",
                    help="GPTQModifier(bypass_divisibility_checks=True): the peer's own way past a group size that "
                         "does not divide the columns (SmolLM2's 576 with 128)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval-text", default=None,
                    help="a .txt file: also the perplexity of the model as llmcompressor leaves it in memory (windows "
                         "of --eval-seqlen consecutive tokens, as sparsegpt_export.evaluation.perplexity), to check "
                         "that the written checkpoint is the model it made")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    result: dict = {"recipe": args.recipe}
    if "gptq" in args.recipe:
        result.update(group_size=args.group_size, bypass_divisibility_checks=args.bypass_divisibility)
    try:
        import torch
        import llmcompressor
        import transformers
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result["versions"] = {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                              "transformers": transformers.__version__}
        ids = load_file(args.calib)["input_ids"][: args.nsamples, : args.seqlen].long()
        if ids.shape[0] < args.nsamples or ids.shape[1] < args.seqlen:
            raise ValueError(f"{args.calib}: input_ids {tuple(ids.shape)} is smaller than "
                             f"{args.nsamples} x {args.seqlen}")
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        if args.device != "cpu":
            model = model.to(args.device)
        tok = AutoTokenizer.from_pretrained(args.model)  # oneshot wants a processor even for token ids
        # "re:.*lm_head": a bare "lm_head" does not match the name SparseGPTModifier gives a top-level target ("lm_head.")
        recipe = [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])]
        if "gptq" in args.recipe:
            from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
            from llmcompressor.modifiers.quantization import GPTQModifier

            scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
                num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size))
            recipe.append(GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                       bypass_divisibility_checks=args.bypass_divisibility))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=args.nsamples,
                max_seq_length=args.seqlen, shuffle_calibration_samples=False)
        result["oneshot_s"] = round(time.perf_counter() - t0, 2)
        if args.device.startswith("cuda"):
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        eval_s = 0.0
        if args.eval_text:
            import math

            import torch.nn.functional as F

            text = Path(args.eval_text).read_text(encoding="utf-8").replace("\r\n", "\n")
            ids_e = tok(text, return_tensors="pt").input_ids[0]
            nlls = []
            with torch.no_grad():
                for i in range(min(args.eval_windows, ids_e.numel() // args.eval_seqlen)):
                    x = ids_e[i * args.eval_seqlen:(i + 1) * args.eval_seqlen].unsqueeze(0).to(args.device)
                    logits = model(input_ids=x, use_cache=False).logits.float()
                    nlls.append(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())
            result["in_process_ppl"] = math.exp(sum(nlls) / len(nlls))
            eval_s = time.perf_counter() - t0 - result["oneshot_s"]
        # a plain float checkpoint: llmcompressor leaves each module's weight as its quantized-dequantized value
        drop = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
              if not k.endswith(drop)}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "float32"
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(out)
        result["wall_s"] = round(time.perf_counter() - t_start - eval_s, 2)  # without the check's evaluation
        code = 0
    except Exception as e:  # the failure is a result: the suite reports it beside ours
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result["failed"] = f"{type(e).__name__}: {e}"[:2000]
        result["traceback_tail"] = tb.strip().splitlines()[-6:]
        code = 3
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    (out / "peer_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
