#!/usr/bin/env bash
# One call on a lent GPU (the device tool's `run`), at most ~8 minutes: check, then time ours against
# transformers' CLIPSeg on the same work. Results go to $OUT (JSON + log); the table is printed last.
#
#   run(command="bash benchmarks/gpu_run.sh", timeout_s=540)
#
# The GPU image has torch, transformers and accelerate but not `datasets`; the data-fed `loop` case runs
# only when `datasets` imports (carry its wheel and its pure-Python dependencies, e.g. in shared/wheels,
# and `pip install --no-index --find-links` them first, if that case is wanted).
set -uo pipefail
OUT=${OUT:-/tmp/clipseg_gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

cases="train_step inference prompts_K train_step_K"
python3 -c "import datasets" 2>/dev/null && cases="$cases loop"

# bf16, batch 64: the anchors in shared/reference/gpu-anchors.md use the same settings.
timeout 200 python3 benchmarks/benchmark.py --device cuda --dtype bf16 --batch_size 64 --warmup 3 --repeats 15 \
  --cases $cases --num_workers 12 --loop_steps 20 --output "$OUT/gpu_bf16_b64.json" 2>&1 | tee "$OUT/gpu_bf16_b64.log"
# The vision tower compiled (torch.compile), same settings.
timeout 240 python3 benchmarks/benchmark.py --device cuda --dtype bf16 --batch_size 64 --warmup 3 --repeats 15 \
  --cases train_step inference prompts_K --compile --output "$OUT/gpu_bf16_b64_compiled.json" 2>&1 \
  | tee "$OUT/gpu_bf16_b64_compiled.log"
echo "== summary =="
grep -h -E "^ +[a-z_0-9]+:" "$OUT"/gpu_*.log
