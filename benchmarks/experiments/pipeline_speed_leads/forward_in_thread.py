import time, threading, torch
from transformers import AutoModelForCausalLM
from sparsegpt_export.models import resolve_model
m = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
blk = m.model.layers[0]
x = torch.randn(32, 512, 576)
pos = torch.arange(512)[None]
pe = m.model.rotary_emb(x, pos)
def run():
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(3):
            blk(x, position_embeddings=pe, attention_mask=None)
        return time.perf_counter() - t
print("main", run(), torch.get_num_threads())
out = {}
def w():
    out["t"] = run(); out["n"] = torch.get_num_threads()
th = threading.Thread(target=w); th.start(); th.join()
print("thread", out)
print("main again", run())
torch.set_num_threads(1); torch.set_num_threads(2)
th = threading.Thread(target=w); th.start(); th.join()
print("thread after set 1->2", out)
from sparsegpt_export.pipeline.layers import one_thread
with one_thread():
    pass
th = threading.Thread(target=w); th.start(); th.join()
print("thread after one_thread", out)
