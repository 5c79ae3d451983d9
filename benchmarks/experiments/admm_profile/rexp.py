import sys, time, torch, json
from safetensors.torch import load_file
from sparsegpt_export.models import load_model
from sparsegpt_export.config import SparseGPTConfig
from sparsegpt_export.pipeline import compress_model
nb = 3
ids = next(iter(load_file("/work/shared/data/calib-smollm2-c4-128x512.safetensors").values()))[:128]
for spec in sys.argv[1:]:
    kw = json.loads(spec)
    model = load_model("smollm2-135m")[0]
    model.model.layers = model.model.layers[:nb]
    model.config.num_hidden_layers = nb
    cfg = SparseGPTConfig(dataset=None, nsamples=128, seqlen=512, **kw)
    t = time.time()
    r = compress_model(model, ids, cfg, progress=False)
    rec = r.report.get("reconstruction", {}).get("blocks", [])
    print(spec, f"{time.time() - t:.1f}s", "mean_rel", round(r.report["summary"]["mean_rel_error"], 5),
          [(round(b["error_before"], 5), round(b["error_after"], 5), b["seconds"]) for b in rec], flush=True)
