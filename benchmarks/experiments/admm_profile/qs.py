import time, torch, sys
from concurrent.futures import ThreadPoolExecutor
sys.argv = sys.argv[:1]
exec(open("/tmp/admm/grid.py").read().split("run(\"obs\", obs)")[0])
from sparsegpt_export.solver.admm import admm_prune
from sparsegpt_export.solver.obs import sparsegpt_solve
stk = {"q": torch.cat([L[0][1], L[1][1], L[2][1]]), "o": L[3][1], "gu": torch.cat([L[4][1], L[5][1]]), "d": L[6][1]}
Hs = {"q": L[0][2], "o": L[3][2], "gu": L[4][2], "d": L[6][2]}
pre = {k: admm_prune(W, Hs[k], n=2, m=4, iters=8, mask_steps=6, workers=2) for k, W in stk.items()}
t = time.perf_counter()
one = {k: sparsegpt_solve(Wa, Hs[k], mask=mk, quant=Q, measure=False) for k, (Wa, mk) in pre.items()}
print("quant sweep 1 thread", time.perf_counter() - t)
def split(k):
    Wa, mk = pre[k]; r = Wa.shape[0] // 2
    with ThreadPoolExecutor(2) as ex:
        parts = list(ex.map(lambda s: sparsegpt_solve(Wa[s], Hs[k], mask=mk[s], quant=Q, measure=False), [slice(0, r), slice(r, None)]))
    return parts
t = time.perf_counter()
two = {k: split(k) for k in pre}
print("quant sweep 2 threads rows split", time.perf_counter() - t)
print("identical", all(torch.equal(torch.cat([p.weight for p in two[k]]), one[k].weight) for k in pre))
