#!/usr/bin/env bash
# Every GPU check and timing in one run of about 8 minutes, on any machine with a CUDA GPU and 16 CPU cores
# (fewer cores: lower --num_workers below), from the repository's root:
#
#   pip install -e ".[dev]"                  # or, where torch/transformers are installed already and the machine
#                                            # has no network: wheels of the rest in .whl/ (see below)
#   OUT=gpu_results bash benchmarks/gpu_run.sh
#   LOOP_ONLY=1 OUT=gpu_results bash benchmarks/gpu_run.sh   # the training step and the data-fed loop only
#
# 0. the tests only a GPU runs (tests/test_gpu.py: the towers' CUDA graph against the eager towers; the training
#    step under PyTorch's sync debug mode, set to errors);
# 1. run_train.py itself on the GPU: eager and --compile --compile_mode reduce-overhead (CUDA graphs) on one
#    small job: the same losses (benchmarks/train_check.py); meanwhile the loop's data is written and stored at
#    the model's size;
# 2. ours with CUDA graphs (run_train.py --compile --compile_mode reduce-overhead) against transformers'
#    CLIPSeg on every case, bf16, batch 64, with the stages, an operator profile and the device's idle gaps;
# 3. the training loop fed by the data pipeline (images stored at the model's size, 14 worker processes; ours
#    runs run_train.py's own training step);
# beside parts 0 and 1: benchmarks/data_samples.py (the data pipeline's CPU costs on that machine).
# Each part is its own process with its own time limit; results go to $OUT, the summary is printed last.
# Offline machines: put the wheels of what the machine lacks (e.g. `datasets` and its dependencies, simplejpeg,
# pytest) in .whl/, made elsewhere with `pip download --only-binary=:all: --platform ... -d .whl ...`; they are
# installed into /tmp/site first.
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

common=(--device cuda --dtype bf16 --batch_size 64 --warmup 5 --repeats 20 --cudnn_benchmark)
loop=(--loop_shrink --num_workers 14 --loop_images 2000 --loop_warmup 30 --loop_steps 60)
quiet() { grep -v -E "Generating|shrinking|Warning|warn\(|^W[0-9]{4} |^ *warnings.warn|_warn_once" ; }
run() {  # run NAME SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" python3 benchmarks/benchmark.py "${common[@]}" "$@" --output "$OUT/$name.json" 2>&1 \
    | quiet | tee "$OUT/$name.log"
  echo "[$name: $((SECONDS - start)) s]" | tee -a "$OUT/$name.log"
}

python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import benchmark as b; \
b.loop_data(b.parse_args(sys.argv[1:]))" "${loop[@]}" > "$OUT/loop_data.log" 2>&1 &
prep=$!
if [[ "${LOOP_ONLY:-0}" == 1 ]]; then
  wait $prep
  run part2_loop 240 --variants lowp_graphs --cases train_step loop "${loop[@]}"
  grep -h -E "^ +[a-z_0-9]+ +[a-z_]+:|\[part" "$OUT"/part2*.log
  exit 0
fi
# The data pipeline's CPU figures on this machine (the main process's share of a batch, each hand-over): beside
# parts 0 and 1 (mostly GPU work) and the loop data's preparation (a few of the 16 cores), which it usually
# outlasts by nothing; done before part 2's fed loop starts.
timeout 200 python3 benchmarks/data_samples.py --num_images 200 --samples 320 --repeats 2 2>&1 | quiet \
  > "$OUT/data_samples.log" &
samples=$!
start=$SECONDS
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 15 | tee "$OUT/part0_gpu_tests.log"
echo "[part0_gpu_tests: $((SECONDS - start)) s]" | tee -a "$OUT/part0_gpu_tests.log"
start=$SECONDS
timeout 150 python3 benchmarks/train_check.py --steps 12 --runs eager cuda_graphs 2>&1 | quiet \
  | tee "$OUT/part1_train_check.log"
echo "[part1_train_check: $((SECONDS - start)) s]" | tee -a "$OUT/part1_train_check.log"
wait $prep $samples

run part2_graphs 240 --variants lowp_graphs --cases stages train_step inference prompts_K train_step_K loop \
  "${loop[@]}" --profile "$OUT/profile_lowp_graphs.txt"

echo "== summary =="
cat "$OUT/machine.txt"
grep -h -E "passed|failed|error|\[part" "$OUT"/part0*.log
grep -h -E "s\): |difference|agree|\[part" "$OUT"/part1*.log
grep -h -E "GFLOP|error vs eager|failed|FAILED|^ +[a-z_0-9]+ +[a-z_]+:|^stages|^ +[a-z +()]+: +[0-9.n]+ / |\[part" \
  "$OUT"/part2*.log
tail -n 3 "$OUT/loop_data.log"
cat "$OUT/data_samples.log"
head -n 30 "$OUT/profile_lowp_graphs.txt"
cat "$OUT/profile_lowp_graphs.txt.gaps.txt"
