#!/usr/bin/env bash
# The GPU checks of the training and SmPO benchmarks, for a machine that is lent for a few minutes: every part
# has its own time limit and writes its results as it goes, so a part cut short still leaves what it measured.
# PARTS picks them (default "tests vs compile", about 580 s, for issue 3; "smpo" is the SmPO part, issue 6):
#
#   tests    tests/test_cuda_graphs.py and tests/test_metrics_log.py on the GPU (some skip on a CPU): CUDA-graph
#            replays against eager calls, the trainer with graphs, the metrics log. ~70 s.
#   vs       our training step against diffusers' train_diffusion_dpo.py: SD1.5 architectures (UNet, VAE and
#            text encoder, random weights) at 512 px, bf16, 8 pairs per step, LoRA rank 8; pairs/s and peak GPU
#            memory. Sides (VS_SIDES): diffusers, ours cached. ~70 s a side.
#   smpo     SmPO (ReNoise K = 1, five-point grid, t_mode exact and grid_below; and the reference's inversion
#            cached, trajectory.cache_inverted) against Diffusion-DPO, the SD1.5 UNet at 64x64 latents, bf16
#            autocast, 4 pairs, full fine-tuning and LoRA, with CUDA graphs for the no-grad calls (SMPO_GRAPHS="off
#            on" adds the eager rows). ~11 s a row.
#   compile  ours cached with train.compile=true against the vs part's diffusers (same machine, same call); model
#            building plus compilation take minutes, so it comes last. It did not fit in the last two sessions.
#
# Time limits (defaults): tests 80, vs 200, smpo 150, compile 300 s. A failing side is recorded and the others go
# on. VS_CLOCK=window (default) waits for the GPU only at the ends of the timed steps, so the trainer's overlap of
# host and GPU work counts; VS_CLOCK=step is the per-step clock of the runs in benchmarks/README.md up to run 3.
#
# Usage (from the repository root, with diffusion_pref importable, e.g. PYTHONPATH=$PWD):
#   DIFFUSERS_SCRIPT=/path/to/train_diffusion_dpo.py OUT=gpu_results bash benchmarks/gpu_check.sh
#   PARTS="tests smpo" ... bash benchmarks/gpu_check.sh
# A dry run on a CPU before spending GPU time (tiny models, a few minutes):
#   PARTS="tests vs smpo compile" VS_MODELS=tiny VS_RESOLUTION=32 VS_BATCH=2 PRECISION=no THREADS=2 VS_STEPS=2 \
#   SMPO_MODELS=tiny SMPO_LATENT=8 SMPO_BATCH=2 SMPO_DTYPE=fp32 SMPO_STEPS=2 OUT=/tmp/gpu_check_dry \
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

PARTS=${PARTS:-tests vs compile}  # any subset of: tests vs smpo compile
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

part tests && timeout "${TESTS_TIMEOUT:-80}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
    tests/test_metrics_log.py tests/test_step_seam.py \
    tests/test_losses.py::test_smpo_takes_host_soft_labels_with_cuda_inputs 2>&1 \
    | tail -25 | tee "$OUT/tests.log"

vs_diffusers() {  # $1: time limit, $2: sides, $3: JSON name
    timeout "$1" $PY benchmarks/bench_vs_diffusers.py \
        --diffusers-script "${DIFFUSERS_SCRIPT:?set DIFFUSERS_SCRIPT to diffusers train_diffusion_dpo.py}" \
        --diffusers-commit "${DIFFUSERS_COMMIT:-58eb52c0803ea9af3abec60841c2a093bdf1f951}" \
        --models "${VS_MODELS:-sd15}" --encoders "${VS_ENCODERS:-sd15}" --resolution "${VS_RESOLUTION:-512}" \
        --batch-size "${VS_BATCH:-8}" --mixed-precision "${PRECISION:-bf16}" --threads "${THREADS:-8}" \
        --steps "${VS_STEPS:-8}" --warmup 3 --repeats 1 --clock "${VS_CLOCK:-window}" --sides "$2" \
        --out "$OUT/$3.json" 2>&1 \
        | grep -v "it/s\]\|s/it\]" | tee "$OUT/$3.log"
}

part vs && vs_diffusers "${VS_TIMEOUT:-200}" "${VS_SIDES:-diffusers,ours-cached}" vs_diffusers

part smpo && timeout "${SMPO_TIMEOUT:-150}" $PY benchmarks/bench_smpo.py --models "${SMPO_MODELS:-sd15}" --latent "${SMPO_LATENT:-64}" \
    --batch-size "${SMPO_BATCH:-4}" --dtype "${SMPO_DTYPE:-bf16}" --steps "${SMPO_STEPS:-6}" --warmup 2 \
    --finetune full lora --cuda-graphs ${SMPO_GRAPHS:-on} \
    --methods dpo smpo-exact smpo-grid_below smpo-cached-exact smpo-cached-grid_below \
    --out "$OUT/smpo_${SMPO_MODELS:-sd15}.json" 2>&1 | tee "$OUT/smpo.log"

part compile && vs_diffusers "${VS_COMPILE_TIMEOUT:-300}" "${VS_COMPILE_SIDES:-ours-cached+train.compile=true}" \
    vs_diffusers_compile
