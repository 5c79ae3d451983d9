"""Issue #25: glibc's heap after each block of a SmolLM2 compress (first N blocks, 2:4 + 4-bit g128, the sweep,
unsmoothed, 128 x 512 calibration tokens): peak RSS, heap size, bytes in use and free (``mallinfo2``). Bytes in use
that grow by a block's activations (151 MB) after every block mean that something keeps old blocks' inputs alive.

    python benchmarks/experiments/pipeline_speed_leads/heap_in_use.py N [noscales]
"""
import ctypes, resource, sys, time, json
import torch
from safetensors.torch import load_file
from sparsegpt_export.models import load_model
from sparsegpt_export.config import SparseGPTConfig
from sparsegpt_export.pipeline import loop, layers
from sparsegpt_export.pipeline.loop import compress_model
nblocks, mode = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "base")
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena","ordblks","smblks","hblks","hblkhd","usmblks","fsmblks","uordblks","fordblks","keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI2
if mode == "noscales":
    orig_rec = layers.LayerRecord
    def rec(**kw):
        kw["scales"] = None; kw["zeros"] = None
        return orig_rec(**kw)
    layers.LayerRecord = rec
orig_cb = loop.compress_block
def cb(state, bi, *a, **k):
    out = orig_cb(state, bi, *a, **k)
    m = libc.mallinfo2()
    print(f"block {bi} maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} heap {m.arena >> 20} inuse {m.uordblks >> 20} free {m.fordblks >> 20} top {m.keepcost >> 20} nfree {m.ordblks}", flush=True)
    return out
loop.compress_block = cb
loaded = load_model("smollm2-135m")
model = loaded[0] if isinstance(loaded, tuple) else loaded
model.model.layers = model.model.layers[:nblocks]; model.config.num_hidden_layers = nblocks
calib = next(iter(load_file("/work/shared/data/calib-smollm2-c4-128x512.safetensors").values()))
cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=128, update="obs", smooth_alpha=0, device="cpu",
                      nsamples=128, seqlen=512, calib_batch_size=128)
res = compress_model(model, calib, cfg, progress=False)
