"""Issue #5 experiment (not a test): MatMulNBits accuracy_level per layer kind on the gqa int4 graph of
benchmarks/onnx_cpu.py (its work folder): logits parity against the torch model on a 512-token WikiText-2 window,
and greedy decode tok/s of 64 tokens after it (median of 3 after a warm-up, the policies interleaved).

    python -m benchmarks.experiments.onnx_levels onnx-int4 c-plain [all4,all1,down1,...]   (raw output: results/onnx_levels.log)
"""
import sys, time, numpy as np, torch, onnx
from benchmarks.studies import onnx_cpu as B
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
import onnxruntime as ort
from sparsegpt_export.onnx import OnnxCausalLM
W = Path.home() / ".cache/sparsegpt-export/bench-onnx"
name, src = sys.argv[1], sys.argv[2]     # e.g. onnx-int4-lmhead4 c-lmhead
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(str(W / src))
ids = tok(B.WIKI.read_text()[:20000].replace("\r\n", "\n"), return_tensors="np").input_ids[:, :512].astype(np.int64)
tm = AutoModelForCausalLM.from_pretrained(str(W / src), dtype=torch.float32).eval()
want = B.Loop(tm).prefill(ids).logits[0].numpy()
del tm
POL = {"all4": [], "all1": ["*"], "down1": ["mlp.down_proj"], "o1": ["self_attn.o_proj"], "qkv1": ["q_k_v_proj"],
       "gateup1": ["gate_up_proj"], "lm1": ["lm_head"], "down+o1": ["mlp.down_proj", "self_attn.o_proj"],
       "qkv+gateup1": ["q_k_v_proj", "gate_up_proj"], "qkv+gateup+o1": ["q_k_v_proj", "gate_up_proj", "self_attn.o_proj"]}
pols = sys.argv[3].split(",") if len(sys.argv) > 3 else list(POL)
base = onnx.load(str(W / name / "model.onnx"))
loops = {}
for p in pols:
    proto = onnx.ModelProto(); proto.CopyFrom(base)
    n1 = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            lvl = 1 if any(k == "*" or k in node.name for k in POL[p]) else 4
            n1 += lvl == 1
            for a in node.attribute:
                if a.name == "accuracy_level": a.i = lvl
    m = OnnxCausalLM.from_pretrained(W / name, num_threads=2)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2; opts.inter_op_num_threads = 1
    m.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    loop = B.Loop(m)
    got = loop.prefill(ids).logits[0].numpy()
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{p}: {n1} nodes at level 1, logits rel err {rel:.3e}", flush=True)
    loops[p] = loop
T = {p: [] for p in pols}
for rep in range(4):
    for p, loop in loops.items():
        out = loop.prefill(ids[:, :512])
        t = time.perf_counter(); loop.decode(out, 64, 512); T[p].append(64 / (time.perf_counter() - t))
for p in pols:
    print(f"{p}: decode tok/s median {np.median(T[p][1:]):.1f} ({min(T[p][1:]):.1f}-{max(T[p][1:]):.1f})", flush=True)
