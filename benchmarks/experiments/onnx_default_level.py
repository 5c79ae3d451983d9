"""Issue #29 experiment: which MatMulNBits setting keeps a compress output (first the unsmoothed README default,
then the smoothed one once smoothing became compress's default) within 2e-2 of torch at the best decode speed.

    python -m benchmarks.experiments.onnx_default_level C_PLAIN INT4_GRAPH FLOAT32_GRAPH [--policies all4,all1,...] [--repeats 3]

Each policy rewrites the int4 graph in memory: ``allL`` every MatMulNBits at accuracy_level L; ``normL`` the nodes
that read a norm's output (packed q/k/v, gate/up, and the lm_head when quantized) at level L, the rest at 4;
``blkB`` every node at level 4 with blocks of B columns (the scales repeated: the same weights, but level 4 then
quantizes the activations per B columns); ``normblkB`` blocks of B for the norm readers only; ``NAME+NAME@L`` the
nodes whose name holds one of the NAMEs (``down_proj``, ``o_proj``, ...) at level L, the rest at 4. Prints, per policy, the logits' relative error against the torch model on a
512-token WikiText-2 window, and greedy decode tok/s through ``generate()`` (short prompt, 64 new tokens, prefill
included) and of the bare loop, median over ``--repeats`` after a warm-up, the policies and the float32 graph
interleaved. Raw output: ``benchmarks/results/onnx_default_level.log``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.studies import onnx_cpu as B

NORM_READERS = ("q_k_v_proj", "gate_up_proj", "lm_head")


def rewrite(proto, policy: str):
    """A copy of ``proto`` under ``policy`` (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    inits = {t.name: t for t in p.graph.initializer}
    for node in p.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in node.attribute}
        if "@" in policy:
            names, level = policy.split("@")
            attrs["accuracy_level"].i = int(level) if any(k in node.name for k in names.split("+")) else 4
        elif policy.startswith("all"):
            attrs["accuracy_level"].i = int(policy[3:])
        elif policy.startswith("norm"):
            attrs["accuracy_level"].i = int(policy[4:]) if any(k in node.name for k in NORM_READERS) else 4
        elif "blk" in policy:
            new, old = int(policy.split("blk")[1]), attrs["block_size"].i
            reads_norm = any(k in node.name for k in NORM_READERS)
            if new < old and (reads_norm or not policy.startswith("norm")):
                k, n = attrs["K"].i, attrs["N"].i
                w, s = inits[node.input[1]], inits[node.input[2]]
                qw = numpy_helper.to_array(w).reshape(n, -1, new // 2)
                sc = np.repeat(numpy_helper.to_array(s).reshape(n, -1), old // new, axis=1)[:, : -(-k // new)]
                w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(qw), w.name))
                s.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(sc.reshape(-1)), s.name))
                attrs["block_size"].i = new
            attrs["accuracy_level"].i = 4
    return p


def model_for(graph: Path, proto, threads: int):
    import onnxruntime as ort

    from sparsegpt_export.onnx import OnnxCausalLM

    m = OnnxCausalLM.from_pretrained(graph, num_threads=threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    m.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return m


def main() -> int:
    import onnx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("int4", type=Path)
    ap.add_argument("float32", type=Path)
    ap.add_argument("--policies", default="all4,all1,norm1,blk32,blk16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load at the start: {B.uptime()}", flush=True)
    tok = AutoTokenizer.from_pretrained(str(args.src))
    ids = tok(B.WIKI.read_text()[:20000].replace("\r\n", "\n"), return_tensors="np").input_ids[:, :512].astype(np.int64)
    short = tok(B.SHORT_PROMPT, return_tensors="np").input_ids.astype(np.int64)
    tm = AutoModelForCausalLM.from_pretrained(str(args.src), dtype=torch.float32).eval()
    want = B.Loop(tm).prefill(ids).logits[0].numpy()
    del tm
    base = onnx.load(str(args.int4 / "model.onnx"))
    models = {"float32": model_for(args.float32, onnx.load(str(args.float32 / "model.onnx")), args.threads)}
    for pol in args.policies.split(","):
        m = model_for(args.int4, rewrite(base, pol), args.threads)
        got = B.Loop(m).prefill(ids).logits[0].numpy()
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        print(f"{pol}: logits rel err {rel:.3e}", flush=True)
        models[pol] = m
    times = {(k, mode): [] for k in models for mode in ("generate", "loop")}
    for rep in range(args.repeats + 1):
        for k, m in models.items():
            for mode, runner in (("generate", B.Gen(m)), ("loop", B.Loop(m))):
                t = time.perf_counter()
                runner.greedy(short, 64)
                if rep:
                    times[(k, mode)].append(64 / (time.perf_counter() - t))
    for k in models:
        g, lo = times[(k, "generate")], times[(k, "loop")]
        rg = statistics.median(g) / statistics.median(times[("float32", "generate")])
        print(f"{k}: generate {statistics.median(g):.1f} tok/s ({min(g):.1f}-{max(g):.1f}), {rg:.2f}x float32; "
              f"loop {statistics.median(lo):.1f} tok/s ({min(lo):.1f}-{max(lo):.1f})", flush=True)
    print(f"load at the end: {B.uptime()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
