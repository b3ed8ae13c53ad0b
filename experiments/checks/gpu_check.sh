#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run of under 10 minutes on one GPU, with
# tiny random models and synthetic shapes only (nothing is downloaded there):
#   1. the CUDA tests: every sparsifier and backend end to end on device=cuda in bf16
#      (tests/test_device.py), the triton kernels against a float64 reference
#      (tests/test_triton_backend.py), index_select on CUDA (tests/test_backends.py);
#   2. the GPU kernel benchmark at Llama-3-8B MLP shapes (4096 x 14336, bf16, rho 0.1-0.6):
#      dense cuBLAS vs index_select vs the triton kernels.
# Output goes to $OUT (or ./gpu_check_out): pytest's log, the benchmark table, nvidia-smi.
#
# The GPU machine has python3 with torch, transformers and triton but not hydra/omegaconf:
# fetch those as wheels here first, from the repository root (.whl is git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 filelock
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # pure Python, an sdist only
# then, carrying .whl, run from the repository root there:
#   bash experiments/checks/gpu_check.sh
set -u -o pipefail
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# the package (its configs ship as sparsebench.conf) without its pinned CPU torch
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/versions.txt"

status=0
timeout 420 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" \
  tests/test_device.py tests/test_triton_backend.py tests/test_backends.py \
  -k "cuda or triton or index_select" 2>&1 | tee "$out/pytest.log" || status=1
timeout 150 python3 -m sparsebench.experiments.checks.gpu_kernel_bench --densities 0.1 0.2 0.3 0.4 0.5 0.6 \
  2>&1 | tee "$out/kernel_bench.txt" || status=1
exit $status
