import time, torch, sys
sys.argv = sys.argv[:1]
exec(open("/tmp/admm/grid.py").read().split("run(\"obs\", obs)")[0])
from sparsegpt_export.solver.admm import _scaled, _inverse, _gradual_drop
def nm_cand(score, n, m):
    r, c = score.shape
    t = score.reshape(r, c // m, m)
    less = (t[..., None, :] < t[..., :, None]) 
    eq = (t[..., None, :] == t[..., :, None]) & torch.tril(torch.ones(m, m, dtype=torch.bool), -1)
    rank = (less | eq).sum(-1)
    return (rank < m - n).reshape(r, c)
def row_drop(score, share, n, m):
    cand = nm_cand(score, n, m)
    per_row = c_per = score.shape[1] * (m - n) // m
    k = round(share * per_row)
    if k >= per_row: return cand
    if k <= 0: return torch.zeros_like(cand)
    s = torch.where(cand, score, torch.full_like(score, float("inf")))
    thr = s.kthvalue(k, dim=1, keepdim=True).values
    return cand & (s <= thr)
def admm2(W, H, iters, ms, rho=1.0, per_row=True):
    Hn, Wn, norm, dead = _scaled(W, H, 0.01)
    target = Wn.matmul(Hn)
    A = Hn.clone(); A.diagonal().add_(rho); Ainv = _inverse(A, "")
    obs_scale = torch.diag(_inverse(Hn, "")).clamp(min=1e-30).rsqrt()[None, :]
    X, U = Wn.clone(), torch.zeros_like(Wn)
    for t in range(iters):
        if t < ms:
            share = (1.0 - (1.0 - (t + 1) / ms) ** 3)
            keep = ~(row_drop((X + U).abs() * obs_scale, share, 2, 4) if per_row else _gradual_drop((X + U).abs() * obs_scale, 0.5 * share, 2, 4))
        Z = (X + U) * keep
        U = U + X - Z
        X = (target + rho * (Z - U)).matmul(Ainv)
    Z = (X + U) * keep
    out = (Z / norm[None, :]).float(); out[:, dead] = 0
    return out, ~keep
x = torch.randn(1536, 1536)
t = time.perf_counter(); a = _gradual_drop(x, 0.3, 2, 4); print("old drop", time.perf_counter() - t)
t = time.perf_counter(); b = row_drop(x, 0.6, 2, 4); print("row drop", time.perf_counter() - t, a.sum().item(), b.sum().item())
from sparsegpt_export.solver.obs import _choose_nm
assert torch.equal(nm_cand(x, 2, 4), _choose_nm(x, 2, 4))
for it, ms in [(40, 30), (20, 15), (12, 9)]:
    run(f"per-row iters={it} ms={ms}", lambda W, H: admm2(W, H, it, ms))
for it, ms in [(20, 15)]:
    run(f"global-fastnm iters={it} ms={ms}", lambda W, H: admm2(W, H, it, ms, per_row=False))
