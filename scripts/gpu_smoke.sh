#!/usr/bin/env bash
# GPU checks of the core: the tutorial MLP picks data parallelism when it fits, pipelines when
# mem_limit_gb forces it; both train. Writes logs under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rannc_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RANNC_PROFILE_CACHE_DIR=
NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "== tutorial 64/512/10 on $NPROC GPUs" | tee "$OUT/smoke.log"
python3 -m torch.distributed.run --standalone --nproc_per_node=$NPROC examples/tutorial.py --batch 64 --hidden 512 --layers 10 --steps 20 2>&1 | tee -a "$OUT/smoke.log" | grep -v "profiling blocks"
echo "== tutorial 64/5000/100 with mem_limit_gb=30" | tee -a "$OUT/smoke.log"
RANNC_MEM_LIMIT_GB=30 python3 -m torch.distributed.run --standalone --nproc_per_node=$NPROC examples/tutorial.py --batch 64 --hidden 5000 --layers 100 --steps 10 2>&1 | tee -a "$OUT/smoke.log" | grep -v "profiling blocks"
