"""Micro-benchmark for issue #5 (not a test): MatMulNBits at one token, 2 threads, on SmolLM2's packed linear shapes,
block 64 vs 128, accuracy_level 1 vs 4. Each graph repeats one weight 10 times (1 for lm_head), so the weights stay
in the CPU caches: this measures the kernels' compute, not the DRAM reads of a real decode step.

    python -m benchmarks.experiments.onnx_matmulnbits_micro   (raw output: benchmarks/results/onnx_matmulnbits_micro.log)
"""
import sys, time, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
import onnxruntime as ort
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
COUNT = {"qkv": 30, "o": 30, "gate_up": 30, "down": 30, "lm_head": 1}
rng = np.random.default_rng(0)
def model(K, N, bs, level, reps):
    nb = -(-K // bs)
    nodes, inits = [], []
    B = rng.integers(0, 256, size=(N, nb, bs // 2), dtype=np.uint8)
    S = (rng.random(N * nb, dtype=np.float32) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(B, "B"), numpy_helper.from_array(S, "S")]
    x = "x"
    outs = []
    for r in range(reps):  # independent nodes on the same input, to amortise session overhead
        nodes.append(helper.make_node("MatMulNBits", [x, "B", "S"], [f"y{r}"], domain="com.microsoft", K=K, N=N, bits=4, block_size=bs, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, [1, 1, N]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
print("onnxruntime", ort.__version__)
for bs in (64, 128):
    for level in (1, 4):
        total = 0.0
        parts = []
        for name, (K, N) in SHAPES.items():
            reps = 1 if name == "lm_head" else 10
            s = ort.InferenceSession(model(K, N, bs, level, reps), so, providers=["CPUExecutionProvider"])
            x = rng.standard_normal((1, 1, K), dtype=np.float32)
            for _ in range(5): s.run(None, {"x": x})
            ts = []
            for _ in range(30):
                t = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t)
            per = float(np.median(ts)) / reps * 1e3
            total += per * COUNT[name]; parts.append(f"{name} {per*1e3:.0f}us")
        print(f"block {bs} level {level}: per step {total:.2f} ms  ({', '.join(parts)})", flush=True)
