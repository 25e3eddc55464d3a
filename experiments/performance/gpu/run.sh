#!/usr/bin/env bash
# One leased-accelerator session of `python -m jseg.bench models` (see ../README.md, "Accelerator").
#
#   bash experiments/performance/gpu/run.sh [bf16|channels_last|fp32]   # from the repository root
#
# Runs on a machine whose python3 has jax (CUDA), torch and torchvision; the
# packages jseg needs beyond those travel as wheels in .whl/ (installed into
# /tmp/site; see the README for the download command). Writes the JSON and the
# log to $OUT (default: ./gpu_out). Each pass is bounded by --deadline_s so a
# lease ends with every finished model written (the JSON is rewritten per model).
#   bf16           jseg (model.dtype=bfloat16) vs the torch twin (bf16 autocast, NCHW) and smp;
#                  measured 2026-11-29: about 100 s per model, UNet++'s jseg child over 120 s.
#   channels_last  the torch twin alone in channels_last bf16 (torch's fastest eager layout).
#   fp32           float32 (TF32 convolutions in both frameworks' defaults).
set -u
PASS=${1:-bf16}
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
COMMON="--preset=paper --batch=8 --size=512 --warmup=3 --repeats=10 --threads=$T"
case "$PASS" in
  bf16)
    python3 -m jseg.bench models $COMMON --models=unet,pspnet,deeplabv3,deeplabv3plus,unetpp \
      --set=dtype=bfloat16 --smp=auto --deadline_s=420 --timeout=300 --out="$OUT/gpu_paper_b8_s512_bf16.json" ;;
  channels_last)
    python3 -m jseg.bench models $COMMON --models=unet,pspnet,deeplabv3,deeplabv3plus,unetpp \
      --set=dtype=bfloat16 --jseg=no --channels_last --deadline_s=240 --timeout=120 \
      --out="$OUT/gpu_paper_b8_s512_bf16_torch_channels_last.json" ;;
  fp32)
    python3 -m jseg.bench models $COMMON --models=unet,pspnet,deeplabv3,deeplabv3plus \
      --deadline_s=400 --timeout=300 --out="$OUT/gpu_paper_b8_s512_fp32.json" ;;
  *) echo "unknown pass '$PASS' (bf16, channels_last, fp32)"; exit 2 ;;
esac
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
echo "[$(elapsed) s] done"
} 2>&1 | tee "$OUT/log_$PASS.txt"
