#!/usr/bin/env bash
# The CUDA checks whose figures docs/benchmarks.md records: run from the repository root on a CUDA
# machine with archplan's dependencies importable. Writes everything to $OUT (default ./cuda-out).
# Each step has its own time limit, so one slow step cannot hide the others.
# STEPS="bench-7b train-none" limits the run to those names, in the order below.
set -u
OUT="${OUT:-cuda-out}"
mkdir -p "$OUT"
A="python3 -m archplan.cli"
step() {  # step LIMIT_S NAME COMMAND...
  local limit=$1 name=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? in $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
step 120 cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_modules_moe.py tests/test_modules_hyena.py tests/test_modules_model.py -k cuda
step 60 bench-7b $A bench 7b --device cuda --layers 4 --dtype bf16 --json
step 60 bench-llama-3-8b $A bench llama-3-8b --device cuda --layers 2 --dtype bf16 --seq 512 --json
step 90 bench-deepseek-v3 $A bench deepseek-v3 --device cuda --layers 1 --dtype bf16 --seq 512 --json
step 60 bench-mixtral $A bench mixtral-8x7b --device cuda --layers 2 --dtype bf16 --json
step 60 verify-moe-cuda $A verify tests/fixtures/distributed/tiny-moe.yaml --seq 32 --batch 2 --device cuda
step 60 verify-hybrid-cuda $A verify hybrid-ssm-moe --device cuda --cpu-check --seq 32
step 60 bench-hyena $A bench hyena-153m --device cuda --seq 1024 --layers 2
step 60 bench-stripedhyena $A bench stripedhyena-7b --device cuda --seq 4096 --layers 2
step 60 bench-s4d $A bench s4d-lm --device cuda --seq 2048
step 60 train-none $A bench gpt2 --train --device cuda --batch 8 --seq 1024 --recompute none
step 60 train-full $A bench gpt2 --train --device cuda --batch 8 --seq 1024 --recompute full
step 60 train-mamba2 $A bench tests/fixtures/distributed/tiny-mamba2.yaml --train --device cuda --seq 128
step 60 train-mla $A bench tests/fixtures/distributed/tiny-mla.yaml --train --device cuda --seq 128
step 60 train-tiny-llama $A bench tests/fixtures/distributed/tiny-llama.yaml --train --device cuda --seq 64 --recompute full
step 60 train-llama $A bench llama-3-8b --train --device cuda --layers 2 --seq 4096 --recompute none
step 60 train-llama-selective $A bench llama-3-8b --train --device cuda --layers 2 --seq 4096 --recompute selective
step 60 train-llama-full $A bench llama-3-8b --train --device cuda --layers 2 --seq 4096 --recompute full
step 60 train-mixtral $A bench mixtral-8x7b --train --device cuda --layers 1 --seq 2048 --recompute none
step 60 train-mtp $A bench benchmarks/specs/small-dsv3-mtp.yaml --train --device cuda --batch 4 --seq 2048 --recompute none
step 60 train-mtp-selective $A bench benchmarks/specs/small-dsv3-mtp.yaml --train --device cuda --batch 4 --seq 2048 --recompute selective
step 60 train-mtp-full $A bench benchmarks/specs/small-dsv3-mtp.yaml --train --device cuda --batch 4 --seq 2048 --recompute full
step 60 train-mamba2-small-vocab $A bench benchmarks/specs/mamba2-small-vocab.yaml --train --device cuda --seq 1024
step 60 train-mamba $A bench mamba-2.8b --train --device cuda --layers 2 --seq 2048 --recompute none
step 60 train-cuda-tests python3 -m pytest -q -p no:cacheprovider tests/test_train_cuda.py
step 90 nproc-1 $A bench gemma-2b --nproc 1 --seq 2048 --iters 3 --layout tp=1,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=1
step 60 backends-gpt2 $A bench gpt2 --device cuda --dtype bf16 --seq 1024 --batch 8 --compare-backends
step 60 backends-gqa $A bench benchmarks/specs/seed-attention.yaml --device cuda --dtype bf16 --seq 8192 --compare-backends
step 120 sweep $A bench benchmarks/specs/seed-attention.yaml benchmarks/specs/seed-mamba.yaml benchmarks/specs/seed-s4d.yaml benchmarks/specs/seed-hyena.yaml benchmarks/specs/seed-hybrid.yaml --device cuda --dtype bf16 --seq 2k,4k,8k,16k --plot "$OUT/cuda-sweep.png" --json
