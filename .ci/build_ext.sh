#!/usr/bin/env bash
# Build the vq_decode extensions in place (python/vla_rft_engine/_vq_cpu*.so, _vq_cuda*.so) through setup.py
# and report the compile time of each variant. CI calls this; no GPU is needed (nvcc only compiles).
#   .ci/build_ext.sh            # incremental: unchanged extensions are skipped
#   .ci/build_ext.sh --clean    # drop previous objects first, so the times are full compile times
#   VLA_RFT_NO_CUDA=1 .ci/build_ext.sh   # CPU variant only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.9;9.0"}

if [[ "${1:-}" == "--clean" ]]; then
  rm -f python/vla_rft_engine/_vq_cpu*.so python/vla_rft_engine/_vq_cuda*.so
  rm -rf build/temp.*/csrc
fi

now() { date +%s.%N; }
# Step 1 builds only _vq_cpu; step 2 builds everything, so only _vq_cuda is left to compile there.
t0=$(now)
VLA_RFT_NO_CUDA=1 "$PY" setup.py -q build_ext --inplace
t1=$(now)
cpu_s=$(echo "$t1 - $t0" | bc)
cuda_s=skipped
if [[ -z "${VLA_RFT_NO_CUDA:-}" ]]; then
  "$PY" setup.py -q build_ext --inplace
  cuda_s=$(echo "$(now) - $t1" | bc)
fi

"$PY" - "$cpu_s" "$cuda_s" <<'PY'
import sys
import importlib.util
cpu = importlib.util.find_spec("vla_rft_engine._vq_cpu") is not None
cuda = importlib.util.find_spec("vla_rft_engine._vq_cuda") is not None
print(f"build_ext: _vq_cpu {'built' if cpu else 'MISSING'} in {float(sys.argv[1]):.1f}s; "
      f"_vq_cuda {'built' if cuda else 'not built'} in "
      f"{sys.argv[2] if sys.argv[2] == 'skipped' else format(float(sys.argv[2]), '.1f') + 's'}")
if not cpu:
    sys.exit(1)
PY
