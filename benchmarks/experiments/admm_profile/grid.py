import time, torch, sys
from safetensors.torch import load_file
from sparsegpt_export.solver.obs import sparsegpt_solve, layer_error
from sparsegpt_export.solver.admm import admm_prune
from sparsegpt_export.quant import QuantSpec
torch.set_num_threads(1)
d = load_file(sys.argv[1] if len(sys.argv) > 1 else "/tmp/admm/block3.safetensors")
groups = {"self_attn.q_proj": ["q_proj", "k_proj", "v_proj"], "self_attn.o_proj": ["o_proj"], "mlp.gate_proj": ["gate_proj", "up_proj"], "mlp.down_proj": ["down_proj"]}
L = [(n, d["W." + hk.split(".")[0] + "." + n], d["H." + hk]) for hk, ns in groups.items() for n in ns]
Q = QuantSpec(bits=4, group_size=128, sym=True)
def run(label, fn):
    tp = tq = ep = eq = 0.0
    for n, W, H in L:
        t = time.perf_counter(); Wa, mask = fn(W, H); tp += time.perf_counter() - t
        ep += layer_error(Wa, W, H)
        t = time.perf_counter(); r = sparsegpt_solve(Wa, H, mask=mask, quant=Q, measure=False); tq += time.perf_counter() - t
        eq += layer_error(r.weight, W, H)
    print(f"{label:40s} prune {tp:6.2f}s err {ep:.4f} | +quant {tp+tq:6.2f}s err {eq:.4f}", flush=True)
def obs(W, H):
    r = sparsegpt_solve(W, H, n=2, m=4, measure=False); return r.weight, r.mask
run("obs", obs)
for it, ms in [(40, 30), (20, 15), (16, 12), (12, 9), (8, 6)]:
    run(f"admm gradual iters={it} mask_steps={ms}", lambda W, H: admm_prune(W, H, n=2, m=4, iters=it, mask_steps=ms))
for it in (5, 10, 20):
    run(f"admm obs-mask iters={it}", lambda W, H: admm_prune(W, H, n=2, m=4, iters=it, mask=obs(W, H)[1]))
from sparsegpt_export.solver.admm import _scaled, _inverse, _gradual_drop
def cg(Wn, Hn, keep, X, iters):
    Gt = Wn.matmul(Hn)  # target
    R = (Gt - X.matmul(Hn)) * keep
    P = R.clone(); rr = (R * R).sum(1, keepdim=True)
    for _ in range(iters):
        AP = P.matmul(Hn) * keep
        alpha = rr / (P * AP).sum(1, keepdim=True).clamp(min=1e-30)
        X = X + alpha * P
        R = R - alpha * AP
        rr2 = (R * R).sum(1, keepdim=True)
        P = R + (rr2 / rr.clamp(min=1e-30)) * P
        rr = rr2
    return X
def admm_cg(W, H, iters, ms, cgi, rho=1.0):
    Hn, Wn, norm, dead = _scaled(W, H, 0.01)
    target = Wn.matmul(Hn)
    A = Hn.clone(); A.diagonal().add_(rho); Ainv = _inverse(A, "")
    obs_scale = torch.diag(_inverse(Hn, "")).clamp(min=1e-30).rsqrt()[None, :]
    X, U = Wn.clone(), torch.zeros_like(Wn)
    for t in range(iters):
        if t < ms:
            keep = ~_gradual_drop((X + U).abs() * obs_scale, 0.5 * (1.0 - (1.0 - (t + 1) / ms) ** 3), 2, 4)
        Z = (X + U) * keep
        U = U + X - Z
        X = (target + rho * (Z - U)).matmul(Ainv)
    Z = (X + U) * keep
    Z = cg(Wn, Hn, keep, Z, cgi)
    out = (Z / norm[None, :]).float(); out[:, dead] = 0
    return out, ~keep
for it, ms, c in [(8, 6, 5), (8, 6, 10), (12, 9, 10), (6, 6, 10), (20, 15, 10), (40, 30, 10)]:
    run(f"admm+cg iters={it} ms={ms} cg={c}", lambda W, H: admm_cg(W, H, it, ms, c))
