#!/usr/bin/env bash
# Everything a GPU machine should run, in one go and with a time limit per step, so that one
# slow step cannot use up a short GPU lease. `make gpu-check` runs it with the project's venv;
# on a bare machine whose python3 has torch: PY=python3 OUT=DIR bash benchmarks/gpu_check.sh
# STEPS picks steps (default: all but profile). Each step's output goes to $OUT/<step>.txt;
# the summary (rc, seconds, last lines) to stdout.
set -u
PY=${PY:-python3}
OUT=${OUT:-gpu-check}
COUNT=${COUNT:-1000}
STEPS=${STEPS:-env pytest_cuda train_eager train_compile predict_folder}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Without a usable CUDA GPU every step would end in a traceback: say so in one line instead.
if ! why=$("$PY" -c '
try:
    import torch
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}"); raise SystemExit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA GPU"); raise SystemExit(1)' 2>/dev/null); then
    echo "gpu-check: skipped, nothing run: ${why:-$PY cannot start} (needs an NVIDIA GPU and a CUDA build of torch)"
    exit 0
fi
mkdir -p "$OUT"
status=0

step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.txt" | sed 's/^/   | /'
    [ "$rc" -eq 0 ] || status=1
}

profile_torch_cuda() {
    # Where bulk predict's time goes on the GPU: the CLI over COUNT linked originals, profiled.
    local folder
    folder=$(mktemp -d)
    local k=0
    while [ $k -lt "$COUNT" ]; do
        for f in tests/data/nih-mini/originals/*.png; do ln -s "$PWD/$f" "$folder/$(printf %06d $k).png"; k=$((k + 1)); done
    done
    "$PY" -m cProfile -o "$OUT/profile.prof" -m chestxray.cli predict "$folder" --backend torch --device cuda \
        --format jsonl --out "$folder.jsonl" --no-progress --batch-size 64 || return 1
    "$PY" -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(45)" "$OUT/profile.prof"
}

step env 30 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
$PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))'"
step pytest_cuda 150 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_gpu_path.py
step train_eager 70 "$PY" benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30 --json
step train_compile 120 "$PY" benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30 --compile --json
TAIL=45 step predict_folder 140 "$PY" benchmarks/predict_folder.py --device cuda --count "$COUNT" --rounds 1 \
    --backends torch,onnx --json
export -f profile_torch_cuda
export PY OUT COUNT
TAIL=60 step profile 90 bash -c profile_torch_cuda
exit $status
