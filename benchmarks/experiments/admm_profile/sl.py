import time, torch, sys
sys.argv = sys.argv[:1]
exec(open("/tmp/admm/grid.py").read().split("run(\"obs\", obs)")[0])
from sparsegpt_export.solver.update import solve_layer, SolveOptions, LayerTask
torch.set_num_threads(1)
stk = {"q": torch.cat([L[0][1], L[1][1], L[2][1]]), "o": L[3][1], "gu": torch.cat([L[4][1], L[5][1]]), "d": L[6][1]}
Hs = {"q": L[0][2], "o": L[3][2], "gu": L[4][2], "d": L[6][2]}
task = LayerTask(prune=True, n=2, m=4, sparsity=0.5)
for upd in ("obs", "admm"):
    for q in (None, Q):
        res = {}
        for w in (1, 2):
            opts = SolveOptions(quant=q, update=upd, refine_steps=24, workers=w)
            t = time.perf_counter()
            res[w] = {k: solve_layer(W, Hs[k], task, opts, name=k)[0] for k, W in stk.items()}
            print(upd, "quant" if q else "prune", "workers", w, f"{time.perf_counter() - t:.2f}s", "err", round(sum(r.rel_error for r in res[w].values()), 5))
        print("  identical", all(torch.equal(res[1][k].weight, res[2][k].weight) and torch.equal(res[1][k].mask, res[2][k].mask) for k in stk))
