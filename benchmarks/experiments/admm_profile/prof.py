import time, torch, sys
from safetensors.torch import load_file
from sparsegpt_export.solver import solve_layer
from sparsegpt_export.solver.update import LayerTask, SolveOptions
from sparsegpt_export.solver.obs import sparsegpt_solve, layer_error
from sparsegpt_export.solver.admm import admm_prune
from sparsegpt_export.quant import QuantSpec
torch.set_num_threads(1)
d = load_file("/tmp/admm/block3.safetensors")
groups = {"self_attn.q_proj": ["q_proj", "k_proj", "v_proj"], "self_attn.o_proj": ["o_proj"], "mlp.gate_proj": ["gate_proj", "up_proj"], "mlp.down_proj": ["down_proj"]}
def weights():
    for hk, names in groups.items():
        pre = hk.split(".")[0]
        for n in names:
            yield n, d["W." + pre + "." + n], d["H." + hk]
task = LayerTask(prune=True, n=2, m=4, sparsity=0.5)
print(QuantSpec.__init__.__doc__)
Q = QuantSpec(bits=4, group_size=128, sym=True)
tot = {}
def add(k, v): tot[k] = tot.get(k, 0) + v
for name, W, H in weights():
    for q in (None, Q):
        tag = "q" if q else "p"
        t = time.perf_counter(); r, _ = solve_layer(W, H, task, SolveOptions(quant=q, update="obs")); add(f"obs_{tag}_s", time.perf_counter() - t); add(f"obs_{tag}_err", r.rel_error)
        t = time.perf_counter(); r, ex = solve_layer(W, H, task, SolveOptions(quant=q, update="admm")); add(f"admm_{tag}_s", time.perf_counter() - t); add(f"admm_{tag}_err", r.rel_error)
    t = time.perf_counter(); o = sparsegpt_solve(W, H, n=2, m=4); add("ref_sweep_s", time.perf_counter() - t)
    t = time.perf_counter(); Wa, mask = admm_prune(W, H, n=2, m=4, iters=40, mask_steps=30); add("admm_iters_s", time.perf_counter() - t)
    t = time.perf_counter(); sparsegpt_solve(Wa, H, mask=mask, quant=Q); add("quant_sweep_s", time.perf_counter() - t)
    print(name, {k: round(v, 4) for k, v in tot.items()}, flush=True)
