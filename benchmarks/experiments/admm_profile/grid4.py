import time, torch, sys
sys.argv = sys.argv[:1]
exec(open("/tmp/admm/grid.py").read().split("run(\"obs\", obs)")[0])
from sparsegpt_export.solver.admm import admm_prune
run("obs", obs)
for it in (40, 32, 24, 20, 16):
    run(f"new admm iters={it} workers=2", lambda W, H: admm_prune(W, H, n=2, m=4, iters=it, mask_steps=3 * it // 4, workers=2))
run(f"new admm iters=24 workers=1", lambda W, H: admm_prune(W, H, n=2, m=4, iters=24, mask_steps=18, workers=1))
