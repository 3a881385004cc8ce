#!/usr/bin/env bash
# One GPU session in one command (a lent machine is short of time, not memory): correctness of
# the compiled Triton kernels and the cuBLAS FP8 backend, the MLA sweep and kernel tables, where the
# FP8 GEMM backends cross over, and `small`'s training steps (bf16 vs FP8, compiled MFU, profiles).
# Logs go to $OUT (default ./gpu_out); the last lines printed summarise every step.
#   bash bench/gpu_session.sh            # all;  STEPS="check kernels" bash bench/gpu_session.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
# the default steps: ~6-7 minutes on an H200 (2026-11-29, with kernels_mla for kernels: 5.5); train / train_fp8 /
# compare / decode on request
STEPS=${STEPS:-"check kernels crossover profile profile_compiled"}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
'F.scaled_mm', hasattr(torch.nn.functional, 'scaled_mm'))"; } > "$OUT/env.log" 2>&1
summary=()
step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, remember the exit status and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name rc=$rc $((SECONDS - t0))s")
    echo "== $name rc=$rc $((SECONDS - t0))s"
}
for s in $STEPS; do
    case $s in
        check) step check 120 $PY bench/gpu_check.py ;;
        kernels) step kernels 180 $PY bench/kernels.py --sweep ;;
        # bf16 then FP8, same seed, data and (constant) schedule: their losses compare step by step
        train) step train 190 $PY -m leanmoe train --preset small --time-budget 90s --schedule constant \
                   --warmup-steps 20 --eval-interval 50 --out /tmp/leanmoe_small --quiet
               cp /tmp/leanmoe_small/report.md "$OUT/report_small.md" 2>/dev/null
               cp /tmp/leanmoe_small/metrics.jsonl "$OUT/metrics_small.jsonl" 2>/dev/null ;;
        train_fp8) step train_fp8 160 $PY -m leanmoe train --preset small --time-budget 90s --schedule constant \
                   --warmup-steps 20 --eval-interval 50 --out /tmp/leanmoe_small_fp8 --quiet --fp8 \
                   --tokenizer /tmp/leanmoe_small/tokenizer.json
                   cp /tmp/leanmoe_small_fp8/metrics.jsonl "$OUT/metrics_small_fp8.jsonl" 2>/dev/null ;;
        mla) step mla 50 $PY bench/kernels.py --only mla ;;
        # kernels with only the MLA sweep (the GEMM tile sweep found nothing new last time)
        kernels_mla) step kernels_mla 150 $PY bench/kernels.py --sweep mla ;;
        # bf16 vs FP8 (Triton and cuBLAS GEMMs) eager steps of `small`, and where bf16's time goes
        crossover) step crossover 90 $PY bench/kernels.py --only crossover ;;
        profile) step profile 100 $PY bench/train_profile.py --steps 5 --variants bf16 fp8:triton fp8:auto \
                     --profile fp8:auto --profile-steps 2 ;;
        # bf16 compiled at the trainer's GPU batch (32 x 2048): MFU, and where its time goes
        profile_compiled) step profile_compiled 150 $PY bench/train_profile.py --variants bf16 --compile \
                              --batch-size 32 --steps 4 --profile-steps 2 ;;
        # bf16 vs FP8 eager, 25 steps of 32 x 1024 tokens, constant schedule: step-by-step losses
        compare) for v in bf16 fp8; do
                     step "cmp_$v" 75 $PY -m leanmoe train --preset small --max-steps 25 --seq-len 1024 \
                         --schedule constant --warmup-steps 10 --eval-interval 25 --compile off --quiet \
                         --out "/tmp/cmp_$v" $( [ $v = fp8 ] && echo --fp8 --tokenizer /tmp/cmp_bf16/tokenizer.json )
                     cp "/tmp/cmp_$v/metrics.jsonl" "$OUT/metrics_cmp_$v.jsonl" 2>/dev/null
                 done ;;
        decode) step decode 120 $PY bench/decode.py --device cuda --dtype bfloat16 --batch-sizes 1 16 64 \
                    --new-tokens 64 --repeats 3 ;;
    esac
done
echo; cat "$OUT/env.log"
for s in $STEPS; do
    [ -f "$OUT/$s.log" ] || continue
    echo "---------------- $s"
    case $s in
        check) grep -E "^FAIL|checks passed|Error|NOTE|layout|cuBLAS" "$OUT/check.log" | head -60 ;;
        kernels|kernels_mla|crossover) grep -vE "^\s*$" "$OUT/$s.log" | tail -75 ;;
        profile*) grep -vE "^\s*$" "$OUT/$s.log" | head -40 ;;
        *) tail -25 "$OUT/$s.log" ;;
    esac
done
printf '%s\n' "${summary[@]}"
