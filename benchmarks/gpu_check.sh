#!/usr/bin/env bash
# Everything a GPU machine should run, in one go and with a time limit per step, so that one
# slow step cannot use up a short GPU lease. `make gpu-check` runs it with the project's venv;
# on a bare machine whose python3 has torch: PY=python3 OUT=DIR bash benchmarks/gpu_check.sh
# Each step's full output goes to $OUT/<step>.txt; the summary (rc, seconds, last lines) to stdout.
set -u
PY=${PY:-python3}
OUT=${OUT:-gpu-check}
COUNT=${COUNT:-1000}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.txt" | sed 's/^/   | /'
    [ "$rc" -eq 0 ] || status=1
}

step env 30 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
$PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))'"
step pytest_cuda 150 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_gpu_path.py
step train_eager 70 "$PY" benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30 --json
step train_compile 120 "$PY" benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30 --compile --json
TAIL=40 step predict_folder 140 "$PY" benchmarks/predict_folder.py --device cuda --count "$COUNT" --rounds 1 \
    --backends torch,onnx --json
exit $status
