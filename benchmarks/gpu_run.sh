#!/usr/bin/env bash
# One call on a lent GPU (the device tool's `run`), about 5.5 minutes: what the first GPU session left open.
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=360)
#
# 1. ours as run_train.py --compile runs it on a GPU (bf16 CLIP compiled, cuDNN autotuner) against
#    transformers' CLIPSeg on every case, bf16, batch 64; the training loop fed by the data pipeline with
#    images stored at the model's size (--shrink_train_images), 14 worker processes, 30 steps before timing
#    (more than the workers prefetch); a profile of the training step.
# 2. the same without cuDNN's autotuner, on the same machine.
# The GPU image has torch, transformers and accelerate but not `datasets`: the loop case needs the wheels of
# datasets and its missing dependencies in .whl/ (benchmarks/RESULTS.md has the download line). Results go to
# $OUT (JSON, logs, the profile); the summary is printed last. benchmarks/RESULTS.md has the command lines of
# the calls made so far and their outputs.
set -uo pipefail
OUT=${OUT:-/tmp/clipseg_gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "cpus $(nproc)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

common=(--device cuda --dtype bf16 --batch_size 64 --warmup 5 --repeats 20 --variants lowp_compile)

timeout 240 python3 benchmarks/benchmark.py "${common[@]}" --cudnn_benchmark \
  --cases inference train_step prompts_K train_step_K loop --loop_shrink --num_workers 14 --loop_images 2000 \
  --loop_warmup 30 --loop_steps 60 --profile "$OUT/profile_lowp_compile.txt" --output "$OUT/gpu_b64_cudnn.json" \
  2>&1 | grep -v -E "Generating|shrinking" | tee "$OUT/gpu_b64_cudnn.log"

timeout 75 python3 benchmarks/benchmark.py "${common[@]}" --cases inference train_step \
  --output "$OUT/gpu_b64.json" 2>&1 | tee "$OUT/gpu_b64.log"

echo "== summary =="
cat "$OUT/machine.txt"
grep -h -E "GFLOP|^ +[a-z_0-9]+ +[a-z_]+:" "$OUT"/gpu_*.log
head -n 24 "$OUT/profile_lowp_compile.txt"
