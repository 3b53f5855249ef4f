#!/usr/bin/env bash
# INT4 vs BF16 GRACE exports served by vLLM: generation throughput and GPU memory.
#
# On a CUDA machine with vLLM installed: builds a tiny Qwen2-VL student with the kit, QAT-trains
# it a few steps (int4, group 128), exports it as int4 (compressed-tensors W4A16) and bf16, serves
# each export with vLLM in a process of its own and prints a table (benchmarks/gpu_grace_vllm.py
# says what is measured). Takes about 2-3 minutes (vLLM runs eager: no compile, no CUDA graphs).
#
#   bash benchmarks/gpu_grace_vllm.sh [RESULTS_DIR]
#
# RESULTS_DIR (default: $OUT if set, else a new temporary directory) receives table.txt,
# prepare.json, serve-<fmt>.json and the vLLM logs; the models are built in a temporary directory
# that is removed at the end. PYTHON: the interpreter with genrecal installed (default
# .venv/bin/python if present, else python3); VLLM_PYTHON: the one with vLLM (default $PYTHON).
# Extra serve options (e.g. --compile, --prompts 128) go in SERVE_ARGS.
#
# Exit status: 0 measured; 1 a step failed; 2 skipped (no CUDA device or no vLLM) with a message.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
VLLM_PYTHON="${VLLM_PYTHON:-$PYTHON}"
RESULTS="${1:-${OUT:-$(mktemp -d -t gpu-grace-vllm-results-XXXX)}}"
SERVE_TIMEOUT="${SERVE_TIMEOUT:-120}"  # seconds per export

if ! "$VLLM_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_grace_vllm: SKIPPED: no CUDA device visible to $VLLM_PYTHON (or no torch there);" \
         "this benchmark needs a GPU." >&2
    exit 2
fi
if ! "$VLLM_PYTHON" -c 'import vllm' 2>/dev/null; then
    echo "gpu_grace_vllm: SKIPPED: vLLM is not installed in $VLLM_PYTHON; install it there" \
         "(pip install vllm) or point VLLM_PYTHON at an interpreter that has it." >&2
    exit 2
fi
if ! "$PYTHON" -c 'import genrecal.train.export' 2>/dev/null; then
    echo "gpu_grace_vllm: genrecal is not importable by $PYTHON; install the project there" \
         "(pip install -e .) or set PYTHON." >&2
    exit 1
fi

WORK="$(mktemp -d -t gpu-grace-vllm-XXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$VLLM_PYTHON" -c 'import vllm, torch; print(f"vllm {vllm.__version__}, torch {torch.__version__}")'

start=$SECONDS
"$PYTHON" benchmarks/gpu_grace_vllm.py prepare "$WORK"
for fmt in bf16 int4; do
    # one process per export: separate GPU memory, and one failing does not stop the other
    # shellcheck disable=SC2086
    if ! timeout "$SERVE_TIMEOUT" "$VLLM_PYTHON" benchmarks/gpu_grace_vllm.py serve "$WORK/$fmt" \
            --label "$fmt" --out "$WORK/serve-$fmt.json" ${SERVE_ARGS:-} >"$WORK/serve-$fmt.log" 2>&1; then
        echo "gpu_grace_vllm: serving the $fmt export failed; last lines of its log:" >&2
        tail -n 25 "$WORK/serve-$fmt.log" >&2
    fi
done
cp "$WORK"/prepare.json "$RESULTS"/
cp "$WORK"/serve-*.log "$RESULTS"/ 2>/dev/null || true
cp "$WORK"/serve-*.json "$RESULTS"/ 2>/dev/null || true
status=0
"$PYTHON" benchmarks/gpu_grace_vllm.py report "$RESULTS" || status=$?
echo "(total $((SECONDS - start)) s; results in $RESULTS)"
exit "$status"
