#!/usr/bin/env bash
# The main job: BERT pretraining of the tiny config on the bundled default corpus, on all GPUs when
# there are any, else on two CPU processes. Extra arguments go to bert/pretrain.py.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())")
else
  NPROC=2
fi
if [ -f bert/pretrain.py ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m bert.pretrain "$@"
else
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" examples/tutorial.py "$@"
fi
