#!/usr/bin/env bash
# Is a newer checkout's compress the same as an older one's, to the last bit, on SmolLM2 (the README's command,
# all 128 windows in one forward)? Each run stops right after the checkpoint of block 2
# (SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK=2, exit 75) and the checkpoints' block weights and scales and the layers'
# reported errors are compared. Run from the project root:
#   bash benchmarks/experiments/pipeline_identity.sh OLD_CHECKOUT NEW_CHECKOUT [WORK]
# (benchmarks/results/pipeline_identity_3blocks.log: 8195336 against 8d179fb, the pipeline rebuilt for issue #25)
set -u
old=$1 new=$2 work=${3:-/tmp/ident}
mkdir -p "$work"
python -c "import sys; from pathlib import Path; from benchmarks.studies.pipeline_speed import installed_layout as L; \
L(Path(sys.argv[1]), Path(sys.argv[3]) / 'site-base'); L(Path(sys.argv[2]), Path(sys.argv[3]) / 'site-new')" "$old" "$new" "$work"
data=$(pwd)/../shared/data/calib-smollm2-c4-128x512.safetensors
for v in base new; do
  args="compress smollm2-135m --pattern 2:4 --bits 4 --group-size 128 --dataset $data --nsamples 128 --seqlen 512 --calib-batch-size 128 --device cpu --no-progress --out $work/out-$v"
  echo "== $v: PYTHONPATH=$work/site-$v python -m sparsegpt_export $args (SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK=2)"
  (cd "$work" && SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK=2 PYTHONPATH=$work/site-$v /usr/bin/time -f "wall %e s, peak RSS %M KB" \
     python -m sparsegpt_export $args 2>&1 | tail -3)
  ls -l "$work/.out-$v.sparsegpt-checkpoint"
done
python - "$work" <<'PY'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
w = Path(sys.argv[1])
a, b = w / ".out-base.sparsegpt-checkpoint", w / ".out-new.sparsegpt-checkpoint"
same = total = 0
for f in sorted(a.glob("block_*.safetensors")) + sorted(a.glob("quant_*.safetensors")):
    ta, tb = load_file(str(f)), load_file(str(b / f.name))
    assert sorted(ta) == sorted(tb), f.name
    for k in ta:
        total += 1
        same += torch.equal(ta[k], tb[k])
ra, rb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
errs = [(x["rel_error"], y["rel_error"]) for x, y in zip(ra["rows"], rb["rows"])]
print(f"tensors identical: {same}/{total}; layer rel. errors equal: {all(x == y for x, y in errs)} ({len(errs)} layers)")
PY
