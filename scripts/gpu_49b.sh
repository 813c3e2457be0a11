#!/usr/bin/env bash
# The seed's 4.9B BERT on all GPUs of the machine: 50 pretraining steps with bert/pretrain.py (the plan,
# a falling loss, samples/s), then rannc vs DDP throughput on all GPUs.
# Logs go under $OUT.
# Needs prepared shards (./scripts/main.sh prepares data/default; carry that folder to an offline GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rannc_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RANNC_PROFILE_CACHE_DIR= OMP_NUM_THREADS=8 \
       TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi -L | tee "$OUT/gpus.txt"
RUN="python3 -m torch.distributed.run --standalone --nproc_per_node"
echo "== pretrain 4.9B, 50 steps, $N GPUs"
timeout 280 $RUN=$N -m bert.pretrain --config_file bert/configs/bert_4.9b.json --max_steps 50 \
  --input_dir "${INPUT_DIR:-data/default}" --train_batch_size 16 --learning_rate 2e-3 --warmup_proportion 0.2 --bf16 --skip_checkpoint \
  --disable_progress_bar --log_freq 5 --output_dir /tmp/run49 2>&1 | grep -v "profiling blocks" \
  | grep -v "^\[rank.\]:  " | tee "$OUT/pretrain_49b.log" | tail -25
echo "== throughput 4.9B: rannc, DDP on $N GPUs"
timeout 420 $RUN=$N benchmarks/bert_throughput.py --config_file bert/configs/bert_4.9b.json --batch_per_gpu 16 \
  --steps 4 --warmup 1 --contenders rannc,ddp --out "$OUT/t49_n$N.json" 2>&1 | grep -v "profiling blocks" \
  | grep -v "^\[rank.\]:  " | tee "$OUT/t49_n$N.log" | tail -8
