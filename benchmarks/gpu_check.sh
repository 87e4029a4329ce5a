#!/usr/bin/env bash
# The GPU checks of the training and SmPO benchmarks in one run (about 9 minutes on one H100, estimated), for a machine that
# is lent for a few minutes: every part has its own time limit and writes its JSON as it goes, so a part cut short
# still leaves what it measured.
#
#   1. our training step against diffusers' train_diffusion_dpo.py: SD1.5 architectures (UNet, VAE and text
#      encoder, random weights) at 512 px, bf16, 8 pairs per step, LoRA rank 8; pairs/s, peak GPU memory, MFU.
#      Sides: diffusers, ours cached, ours cached with train.compile=true (its compilation falls in the warm-up
#      steps: a few minutes), ours uncached with 4 data workers; then ours cached once under the profiler.
#   2. SmPO (ReNoise K = 1 and DDIM, five-point grid, t_mode exact and grid_below) against Diffusion-DPO, the
#      SD1.5 UNet at 64x64 latents, bf16 autocast, 4 pairs, full fine-tuning and LoRA.
#   3. only with SMPO_COMPILE=default (or another torch.compile mode): DPO and SmPO grid_below with both UNets
#      compiled, full fine-tuning (each method compiles afresh: budget several minutes).
#
# Time limits (defaults): part 1 440 s, part 2 120 s, part 3 300 s; parts 1 and 2 fit one 600 s device call with
# the wheel install. A part that runs out keeps what it wrote; a failing side is recorded and the others go on.
#
# Usage (from the repository root, with diffusion_pref importable, e.g. PYTHONPATH=$PWD):
#   DIFFUSERS_SCRIPT=/path/to/train_diffusion_dpo.py OUT=gpu_results bash benchmarks/gpu_check.sh
# A dry run on a CPU before spending GPU time (tiny models, a minute or two):
#   VS_MODELS=tiny VS_RESOLUTION=32 VS_BATCH=2 PRECISION=no THREADS=2 VS_STEPS=2 VS_REPEATS=1 SMPO_MODELS=tiny \
#   SMPO_LATENT=8 SMPO_BATCH=2 SMPO_DTYPE=fp32 SMPO_STEPS=2 OUT=/tmp/gpu_check_dry \
#   DIFFUSERS_SCRIPT=/path/to/train_diffusion_dpo.py bash benchmarks/gpu_check.sh
# diffusers' script is not part of this project: see benchmarks/README.md for where to get it.
set -u
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import platform, torch, diffusers, transformers, peft, accelerate, datasets
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'cpus', __import__('os').cpu_count())" \
    >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout "${VS_DIFFUSERS_TIMEOUT:-440}" $PY benchmarks/bench_vs_diffusers.py \
    --diffusers-script "${DIFFUSERS_SCRIPT:?set DIFFUSERS_SCRIPT to diffusers train_diffusion_dpo.py}" \
    --diffusers-commit "${DIFFUSERS_COMMIT:-58eb52c0803ea9af3abec60841c2a093bdf1f951}" \
    --models "${VS_MODELS:-sd15}" --encoders "${VS_ENCODERS:-sd15}" --resolution "${VS_RESOLUTION:-512}" \
    --batch-size "${VS_BATCH:-8}" --mixed-precision "${PRECISION:-bf16}" --threads "${THREADS:-8}" \
    --steps "${VS_STEPS:-8}" --warmup 3 --repeats "${VS_REPEATS:-1}" --flops \
    --sides "${VS_SIDES:-diffusers,ours-cached,ours-cached+train.compile=true,ours-uncached+data.num_workers=4}" \
    --profile "${VS_PROFILE:-ours-cached}" \
    --out "$OUT/vs_diffusers_${VS_MODELS:-sd15}_${VS_RESOLUTION:-512}.json" 2>&1 | grep -v "it/s\]\|s/it\]" | tee "$OUT/vs_diffusers.log"

timeout "${SMPO_TIMEOUT:-120}" $PY benchmarks/bench_smpo.py --models "${SMPO_MODELS:-sd15}" --latent "${SMPO_LATENT:-64}" \
    --batch-size "${SMPO_BATCH:-4}" --dtype "${SMPO_DTYPE:-bf16}" \
    --steps "${SMPO_STEPS:-6}" --finetune full lora \
    --methods dpo smpo-exact smpo-grid_below smpo-ddim-exact smpo-ddim-grid_below \
    --out "$OUT/smpo_${SMPO_MODELS:-sd15}.json" 2>&1 | tee "$OUT/smpo.log"

if [ -n "${SMPO_COMPILE:-}" ]; then
    timeout "${SMPO_COMPILE_TIMEOUT:-300}" $PY benchmarks/bench_smpo.py --models "${SMPO_MODELS:-sd15}" \
        --latent "${SMPO_LATENT:-64}" --batch-size "${SMPO_BATCH:-4}" --dtype "${SMPO_DTYPE:-bf16}" \
        --steps "${SMPO_STEPS:-6}" --warmup 3 --compile "$SMPO_COMPILE" --finetune full \
        --methods dpo smpo-grid_below --out "$OUT/smpo_${SMPO_MODELS:-sd15}_compiled.json" 2>&1 | tee "$OUT/smpo_compiled.log"
fi
