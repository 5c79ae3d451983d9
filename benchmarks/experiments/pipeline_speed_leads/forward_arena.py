"""Issue #25: a block's forward in the main thread against the same forward in a worker thread, under
``hostmem.reuse_freed_memory`` (as a compress run on the CPU has it): wall time and page faults (SmolLM2 block 0,
N x 512 tokens, 2 forwards per measurement). glibc serves a worker thread from an arena whose heaps hold at most
64 MB, so every larger tensor there is a fresh mmap, whatever mallopt says.

    python benchmarks/experiments/pipeline_speed_leads/forward_arena.py [N=128]
"""
import resource, sys, threading, time
import torch
from transformers import AutoModelForCausalLM
from sparsegpt_export import hostmem
from sparsegpt_export.models import resolve_model

m = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
blk = m.model.layers[0]
n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
x = torch.randn(n, 512, 576)
pe = m.model.rotary_emb(x, torch.arange(512)[None])

def run(out):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):
            blk(x, position_embeddings=pe, attention_mask=None)
    out["t"] = round(time.perf_counter() - t, 2)
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

def in_thread():
    out = {}
    th = threading.Thread(target=run, args=(out,)); th.start(); th.join()
    return out

with hostmem.reuse_freed_memory() as ok:
    print("reuse on:", ok)
    for i in range(2):
        o = {}; run(o); print("main  ", o, flush=True)
        print("thread", in_thread(), flush=True)
