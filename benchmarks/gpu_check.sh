#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one pass of at most 550 s of stage limits (the device
# tool allows 600 s per command): the CUDA tests
# (tests/test_cuda.py and the loader's), the estimator benchmark on CUDA (with the per-layer form
# timings that calibrate kernels.FUSED_ELEMENT_MACS["cuda"], and each layer's host time in a measuring
# step, from --layers), the training loop with and without CUDA graphs (benchmarks/throughput.py),
# compile's two modes (benchmarks/compile.py), the loader benchmark on CUDA and the DDP benchmark
# with nccl.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh      # from the repository root, on a GPU machine
#
# It installs nothing into the machine's Python: dbx (for its entry points) and, on a machine that
# cannot reach a package index, the wheels found in .whl/ go to a folder of their own on
# PYTHONPATH. Every stage runs even if one before it failed; the exit status is the worst of them.
set -u
out=${OUT:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
site=${DBX_GPU_SITE:-/tmp/dbx-gpu-site}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
status=0

stage() {  # stage NAME SECONDS COMMAND...: run, keep its output, remember a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name" | tee -a "$out/summary.txt"
    local start=$SECONDS
    timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt"
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

mkdir -p "$site"
if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        >"$out/install.txt" 2>&1 || { echo "installing .whl/ failed"; cat "$out/install.txt"; status=1; }
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$site" . >>"$out/install.txt" 2>&1 || { echo "installing dbx failed"; cat "$out/install.txt"; exit 1; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

stage tests 150 $py -m pytest -q -rs -p no:cacheprovider --durations=5 \
    tests/test_cuda.py tests/test_data_loader.py tests/test_data_augment.py
stage estimators 120 $py benchmarks/estimators.py --device cuda --models ${MODELS:-resnet18,mlp} --batch-sizes 128,512 \
    --methods plain,exact,vmap --steps 20 --other-steps 3 --forms --layers --json "$out/estimators.json"
# The loop on CUDA: bare vs dbx's plain epoch vs its measuring epoch vs cuda_graphs: true, ResNet-18 at
# B = 128 (targets: measuring/dbx <= 1.25; graphs/dbx > 1 where the step is bound by the host).
stage graphs 90 $py benchmarks/throughput.py --device cuda --models resnet18_cifar,small_cnn --batch-sizes 128 \
    --samples 4096 --rounds 3 --min-seconds 1 --threads 4 --cuda-graphs
stage compile 75 $py benchmarks/compile.py --device cuda --models small_cnn,mlp --batch-sizes 64,128,256
[ -n "${SKIP_LOADER:-}" ] || stage loader 40 $py benchmarks/loader.py --device cuda --rotation 15 --batch-size 1024
# DDP with nccl: 1 process, and 2 when the machine has 2 GPUs (with one GPU the script says it skips 2)
stage ddp 75 $py benchmarks/ddp.py --device cuda --nprocs 1,2 --batch-size 2048 --json "$out/ddp.json"
exit $status
