#!/usr/bin/env bash
# One leased-accelerator session of `python -m jseg.bench models` (see ../README.md, "Accelerator").
#
#   bash experiments/performance/gpu/run.sh            # from the repository root
#
# Runs on a machine whose python3 has jax (CUDA), torch and torchvision; the
# packages jseg needs beyond those travel as wheels in .whl/ (installed into
# /tmp/site). Writes the JSON and the log to $OUT (default: ./gpu_out). The
# runs are ordered by priority and bounded by --deadline_s, so that a lease of
# about ten minutes ends with every finished model written.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
{
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'PY'
import jax, flax, optax, torch
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, torch.cuda.get_device_name())
try:
  import segmentation_models_pytorch as smp, torchvision
  print("smp", smp.__version__, "torchvision", torchvision.__version__)
except Exception as e:
  print("smp unavailable:", e)
import jseg.trainer, jseg.models  # fails here, loudly, if the image's jax/flax broke an API we use
print("jseg imports")
PY
T=$(nproc)
echo "[$(elapsed) s] bf16, paper-sized networks, batch 8, 512x512"
python3 -m jseg.bench models --preset=paper --models=pspnet,deeplabv3plus,unet,deeplabv3,unetpp \
  --batch=8 --size=512 --warmup=3 --repeats=10 --threads="$T" --set=dtype=bfloat16 --smp=auto \
  --deadline_s=${BF16_DEADLINE:-290} --timeout=200 --out="$OUT/gpu_paper_b8_s512_bf16.json"
if [ "$(elapsed)" -lt "${FP32_IF_BEFORE:-400}" ]; then
  echo "[$(elapsed) s] float32 (TF32 convolutions in both), batch 8, 512x512"
  python3 -m jseg.bench models --preset=paper --models=unet,pspnet,deeplabv3plus \
    --batch=8 --size=512 --warmup=3 --repeats=10 --threads="$T" --smp=no \
    --deadline_s=$(( ${FP32_IF_BEFORE:-400} + 60 - $(elapsed) )) --timeout=150 --out="$OUT/gpu_paper_b8_s512_fp32.json"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
echo "[$(elapsed) s] done"
} 2>&1 | tee "$OUT/log.txt"
