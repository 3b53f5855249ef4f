#!/usr/bin/env bash
# The teacher pass of a tiny Qwen2-VL teacher through transformers and through vLLM, on a GPU:
# do their features agree, and how many tokens/s does each extract? (issue 13)
#
#   bash benchmarks/gpu_extract_vllm.sh [RESULTS_DIR]
#
# PYTHON: the interpreter with genrecal installed (default .venv/bin/python if present, else
# python3); VLLM_PYTHON: one with a CUDA build of vLLM (default $PYTHON; the CPU .venv-vllm will
# not do). RESULTS_DIR (default: $OUT if set, else a new temporary directory) receives
# table.txt, result.json and the log. benchmarks/gpu_extract_vllm.py says what is measured and
# what "agree" means. About 2-3 minutes (two engine start-ups, eager mode; 64 samples).
#
# Exit status: 0 the features agree; 1 they disagree or a step failed; 2 skipped (no CUDA
# device or no vLLM) with a message.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
VLLM_PYTHON="${VLLM_PYTHON:-$PYTHON}"
RESULTS="${1:-${OUT:-$(mktemp -d -t gpu-extract-vllm-results-XXXX)}}"
mkdir -p "$RESULTS"

if ! "$VLLM_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_extract_vllm: SKIPPED: no CUDA device visible to $VLLM_PYTHON (or no torch there);" \
         "this check needs a GPU." >&2
    exit 2
fi
if ! "$VLLM_PYTHON" -c 'import vllm' 2>/dev/null; then
    echo "gpu_extract_vllm: SKIPPED: vLLM is not installed in $VLLM_PYTHON; install a CUDA build" \
         "there or point VLLM_PYTHON at an interpreter that has it." >&2
    exit 2
fi
if ! "$PYTHON" -c 'import genrecal.extract.vllm_engine' 2>/dev/null; then
    echo "gpu_extract_vllm: genrecal is not importable by $PYTHON; install the project there" \
         "(pip install -e .) or set PYTHON." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$VLLM_PYTHON" -c 'import vllm, torch, transformers; print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'

start=$SECONDS
status=0
"$PYTHON" benchmarks/gpu_extract_vllm.py "$RESULTS" --vllm-python "$(command -v "$VLLM_PYTHON")" \
    ${EXTRACT_ARGS:-} 2>"$RESULTS/log.txt" || status=$?
if [[ $status -ne 0 && ! -f "$RESULTS/table.txt" ]]; then
    echo "gpu_extract_vllm: failed; last lines of its log:" >&2
    tail -n 40 "$RESULTS/log.txt" >&2
fi
echo "(total $((SECONDS - start)) s; results in $RESULTS)"
exit "$status"
