#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md and a GPU smoke run of the tiny recipes, in one
# go, for a machine with one NVIDIA GPU and no network (about 10 minutes on an H100).
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (default: gpu_results/)
#   bash benchmarks/gpu_check.sh --cpu      # the same steps, tiny and on the CPU: checks the script
#
# It needs torch with CUDA, transformers, accelerate, tokenizers and `datasets`. On a
# machine without `datasets` and without network, fetch its wheels where pip works first
# (the versions that match the machine's Python, here 3.12) and bring the folder along:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# Wheels found in .whl/ are installed into /tmp/site before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda; TEXT=small; BERT=base; MAE=base; ROUNDS=(--rounds 8 --steps-per-round 2 --warmup 3)
STEPS=50; PRECISION=bf16
if [[ "${1:-}" == "--cpu" ]]; then
    DEVICE=cpu; TEXT=tiny; BERT=tiny; MAE=tiny; ROUNDS=(--rounds 1 --steps-per-round 1 --warmup 1)
    STEPS=3; PRECISION=fp32
fi
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LMSSL_CACHE=${LMSSL_CACHE:-/tmp/lmssl_cache}
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import lmssl" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . || exit 1
"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF

failures=0
step() {  # step NAME COMMAND...: run one command, keep its output, go on after a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    if (( rc != 0 )); then
        failures=$((failures + 1))
        echo "   FAILED (exit $rc), last lines:"
    fi
    tail -n 6 "$OUT/$name.txt"
}

# 1. the targets: GPT-2 124M at 1024 tokens and BERT-base MLM, bf16, compiled (and GPT-2 eager)
step gpt_"$TEXT"_compiled "$PY" -m lmssl bench gpt --size "$TEXT" --device "$DEVICE" --precision "$PRECISION" \
    --compile "${ROUNDS[@]}" --json "$OUT/gpt_${TEXT}_compiled.json"
step bert_"$BERT"_compiled "$PY" -m lmssl bench bert --size "$BERT" --device "$DEVICE" --precision "$PRECISION" \
    --compile "${ROUNDS[@]}" --json "$OUT/bert_${BERT}_compiled.json"
step gpt_"$TEXT"_eager "$PY" -m lmssl bench gpt --size "$TEXT" --device "$DEVICE" --precision "$PRECISION" \
    "${ROUNDS[@]}" --json "$OUT/gpt_${TEXT}_eager.json"
# 2. the other families, eager
step llama_"$TEXT" "$PY" -m lmssl bench llama --size "$TEXT" --device "$DEVICE" --precision "$PRECISION" \
    "${ROUNDS[@]}" --json "$OUT/llama_${TEXT}.json"
step mae_"$MAE" "$PY" -m lmssl bench mae --size "$MAE" --device "$DEVICE" --precision "$PRECISION" \
    "${ROUNDS[@]}" --json "$OUT/mae_${MAE}.json"
step simclr_"$MAE" "$PY" -m lmssl bench simclr --size "$MAE" --device "$DEVICE" --precision "$PRECISION" \
    "${ROUNDS[@]}" --json "$OUT/simclr_${MAE}.json"
# 3. smoke: the tiny recipes train on the GPU through the real loop (bundled data)
mixed=$([[ $DEVICE == cuda ]] && echo bf16 || echo no)
for recipe in gpt_tiny bert_tiny cpc_tiny mae_tiny simclr_tiny byol_tiny; do
    step "pretrain_$recipe" "$PY" -m lmssl pretrain "recipes/$recipe.yaml" "train.max_steps=$STEPS" \
        "train.eval_every=$STEPS" "train.save_every=$STEPS" "train.mixed_precision=$mixed" \
        "train.output_dir=/tmp/gpu_check/$recipe" train.overwrite=true train.progress=false
done

echo "== $failures step(s) failed; results in $OUT"
exit $((failures > 0))
