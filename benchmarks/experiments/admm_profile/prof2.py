import time, torch
from safetensors.torch import load_file
import sparsegpt_export.solver.admm as A
torch.set_num_threads(1)
d = load_file("/tmp/admm/block3.safetensors")
W, H = d["W.mlp.down_proj"], d["H.mlp.down_proj"]
acc = {"drop": 0.0, "mm": 0.0}
orig = A._gradual_drop
def drop(*a):
    t = time.perf_counter(); r = orig(*a); acc["drop"] += time.perf_counter() - t; return r
A._gradual_drop = drop
t = time.perf_counter(); A.admm_prune(W, H, n=2, m=4, iters=40, mask_steps=30); tot = time.perf_counter() - t
X = torch.randn_like(W); Ai = torch.randn(H.shape)
t = time.perf_counter()
for _ in range(40): X.matmul(Ai)
print("total", tot, "drop", acc["drop"], "40 matmuls", time.perf_counter() - t)
