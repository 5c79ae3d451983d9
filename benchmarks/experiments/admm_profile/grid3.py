import time, torch, sys
sys.argv = sys.argv[:1]
exec(open("/tmp/admm/grid.py").read().split("run(\"obs\", obs)")[0])
from sparsegpt_export.solver.admm import admm_prune
run("obs", obs)
outs = {}
for it in (40, 24, 20, 16):
    for w in (1, 2):
        run(f"new admm iters={it} workers={w}", lambda W, H: admm_prune(W, H, n=2, m=4, iters=it, mask_steps=3 * it // 4, workers=w))
W, H = L[-1][1], L[-1][2]
a = admm_prune(W, H, n=2, m=4, iters=8, mask_steps=6, workers=1)
b = admm_prune(W, H, n=2, m=4, iters=8, mask_steps=6, workers=2)
c = admm_prune(W[:100], H, n=2, m=4, iters=8, mask_steps=6, workers=1)
print("workers identical", torch.equal(a[0], b[0]), torch.equal(a[1], b[1]), "slice identical", torch.equal(a[0][:100], c[0]))
