"""Where the resident memory of a compression goes, phase by phase (issue #8).

Runs ``sparsegpt-export compress ARGS...`` in this process with the pipeline's functions wrapped (the solve, its
inverse Cholesky and scale refit, the Hessian accumulation, the block fetch/release of ``--offload disk``, the
capture of the first block's inputs, the checkpoint write) and a thread sampling the RSS every 5 ms; prints the
peak RSS seen in each phase, ``ru_maxrss``, and RSS (anonymous / file-backed) after each fetch, checkpoint and
release. Used for the scale benchmark's profile on a 3-block model of the same shapes:

    python -m benchmarks.studies.scale --_make /tmp/prof/llama3 /tmp/prof/calib.safetensors 3 1536 4096 64000 12 16 256
    python -m benchmarks.experiments.memory_profile compress /tmp/prof/llama3 --dataset /tmp/prof/calib.safetensors \\
        --nsamples 16 --seqlen 256 --pattern 2:4 --bits 4 --group-size 128 --device cpu --no-progress \\
        --overwrite --offload disk --offload-dir /tmp/prof/stage --out /tmp/prof/out
"""
import os, sys, threading, time, collections
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20
stack = ["startup"]
block = [-1]  # the block at work (set by the fetch of --offload disk)
peak = collections.defaultdict(float)
timeline = []
def sampler():
    while True:
        r = rss(); lab = f"b{block[0]}:" + "/".join(stack[-3:])
        if r > peak[lab]: peak[lab] = r
        time.sleep(0.005)
threading.Thread(target=sampler, daemon=True).start()
import sparsegpt_export.offload as off
import sparsegpt_export.pipeline.checkpoint as ckpt, sparsegpt_export.pipeline.loop as loop
import sparsegpt_export.solver.obs as sol, sparsegpt_export.solver.update as upd
from sparsegpt_export.solver import HessianAccumulator
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        if label == "fetch":
            block[0] = a[1]
        stack.append(label)
        try: return f(*a, **k)
        finally:
            stack.pop()
            if label in ("release", "fetch", "ckpt"):
                st = dict(l.split(":", 1) for l in open("/proc/self/status"))
                timeline.append((label, round(rss()), st["RssAnon"].strip(), st["RssFile"].strip()))
    setattr(obj, name, g)
wrap(upd, "sparsegpt_solve", "solve")
wrap(loop, "capture_block_inputs", "capture")
wrap(off.DiskStore, "fetch", "fetch")
wrap(off.DiskStore, "release", "release")
wrap(ckpt, "save", "ckpt")
wrap(HessianAccumulator, "add", "hess")
wrap(sol, "_inverse_cholesky", "invchol")
wrap(sol, "_refit_scales", "refit")
try:  # the block's own parts, for Llama-architecture models
    from transformers.models.llama import modeling_llama as ml
    wrap(ml.LlamaAttention, "forward", "attn")
    wrap(ml.LlamaMLP, "forward", "mlp")
except ImportError:
    pass
from sparsegpt_export.cli import main
try:
    main(sys.argv[1:])
finally:
    print("PEAKS (MB) by phase:")
    for k, v in sorted(peak.items(), key=lambda x: -x[1])[:40]:
        print(f"  {v:8.1f}  {k}")
    import resource
    print("ru_maxrss MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("timeline tail", timeline)
