import torch, sys
from safetensors.torch import load_file, save_file
from sparsegpt_export.models import load_model
torch.set_num_threads(1)
model = load_model("smollm2-135m")[0]
ids = load_file("/work/shared/data/calib-smollm2-c4-128x512.safetensors")
ids = next(iter(ids.values()))[:128]
print(ids.shape)
blk = int(sys.argv[1]) if len(sys.argv) > 1 else 3
layer = model.model.layers[blk]
Hs, counts = {}, {}
def hook(name):
    def f(mod, inp):
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()
        Hs[name] = Hs.get(name, 0) + x.T.double() @ x.double()
        counts[name] = counts.get(name, 0) + x.shape[0]
    return f
for name in ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]:
    layer.get_submodule(name).register_forward_pre_hook(hook(name))
orig = model.model.layers
model.model.layers = orig[:blk + 1]
with torch.no_grad():
    for i in range(0, 128, 16):
        model.model(ids[i:i + 16])
out = {}
for k, v in Hs.items():
    out["H." + k] = (2 * v / counts[k]).float()
for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
    out["W." + name] = layer.get_submodule(name).weight.detach().float().contiguous()
save_file(out, f"/tmp/admm/block{blk}.safetensors")
print({k: tuple(v.shape) for k, v in out.items()})
