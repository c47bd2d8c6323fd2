#!/usr/bin/env bash
# The quickstart: a small Imagen cascade trained and sampled end to end on a CPU, on the
# built-in shapes data, within a 20-minute budget (one slow core included; --minutes).
#
#   ./launch/quickstart.sh [--smoke] [--t5=PATH] [OUT_DIR]       (OUT_DIR: runs/quickstart)
#   T5_PATH=ckpt/t5-v1_1-small ./launch/quickstart.sh            (same as --t5=PATH)
#
# Phases (each prints a header with the elapsed time; the CLIs show progress bars):
#   0. creates .venv if missing and installs the package (pip install -e ".[test]");
#   1. text assets: a sentencepiece model of the shapes captions and a small T5, random
#      and then grounded for a minute on the shapes training split, after which it stays
#      fixed (python -m imagen_jax.quickstart.text_assets; docs/quickstart.md), unless
#      --t5 names a real T5;
#   2. imagen-embed: T5 embeddings of every shapes caption (training and held-out splits);
#   3. imagen-train: the 16x16 base model (experiments/quickstart_base.gin);
#   4. imagen-train: the 16->64 super-resolution model, trained on 32x32 crops
#      (experiments/quickstart_sr.gin);
#   5. imagen-sample: experiments/quickstart_prompts.txt through the cascade into
#      OUT_DIR/samples/ (stage0/ 16 px, stage1/ 64 px, grid.png, index.jsonl);
#   6. imagen-eval shapesbench: scores every image; prints one table per stage.
#
# --smoke: every phase with tiny models, a few steps and a few prompts (CI; ~2 minutes).
# --minutes=N: the run's time budget (default 20). Each training stage's time guard
#   (train.max_minutes) is the time left before the budget ends, less what the phases
#   after it need, so a slow machine trains as long as the budget allows and the run
#   still ends within it; a fast one finishes the planned steps first.
# --grounding_steps=N: steps of grounding for the small T5 (default 1000, 5 with --smoke;
#   0 keeps its fixed random weights, the setup before grounding; docs/quickstart.md).
# --t5=PATH (or T5_PATH=PATH): a Hugging Face T5 directory (config.json, model.safetensors,
#   spiece.model), e.g. t5-v1_1-small converted as docs/text.md says. Its width becomes the
#   models' TEXT_DIM and captions may take up to 32 of its tokens.
# Rerunning with the same OUT_DIR resumes: finished phases are skipped or return at once
# (training resumes from its last checkpoint, sampling skips images already written).
# Extra environment: PYTHON (the interpreter that creates .venv, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

me="quickstart.sh"
usage() {
  echo "usage: $me [--smoke] [--minutes=N] [--t5=PATH | --grounding_steps=N] [OUT_DIR]   (default OUT_DIR: runs/quickstart)" >&2
  exit 2
}
die() { echo "$me: $*" >&2; exit 2; }

smoke=0
t5="${T5_PATH:-}"
grounding_steps=""
minutes=20
out=""
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    --t5=*) t5="${arg#--t5=}" ;;
    --grounding_steps=*) grounding_steps="${arg#--grounding_steps=}" ;;
    --minutes=*) minutes="${arg#--minutes=}" ;;
    -h|--help) usage ;;
    -*) echo "$me: unknown option $arg" >&2; usage ;;
    *) [ -z "$out" ] || usage; out="$arg" ;;
  esac
done
if [ -n "$grounding_steps" ]; then
  [[ "$grounding_steps" =~ ^[0-9]+$ ]] || die "--grounding_steps=$grounding_steps must be a" \
      "whole number of steps (0: the small T5 keeps its random weights)"
  [ -z "$t5" ] || die "--grounding_steps applies to the quickstart's small T5, not to" \
      "--t5=$t5; drop one of the two"
elif [ "$smoke" = 1 ]; then
  grounding_steps=5
else
  grounding_steps=1000
fi
[[ "$minutes" =~ ^[0-9]+$ ]] && [ "$minutes" -ge 10 ] || die "--minutes=$minutes must be a" \
    "whole number of minutes, at least 10 (the default 20 fits one slow core)"
out="${out:-runs/quickstart}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

start=$(date +%s)
# What the phases after a training stage need on one slow core (seconds): sampling and
# scoring took 84-94 s; the SR stage, sampled from t = 0.2, keeps its input's colours and
# shapes from about 80 steps, and a half-speed core reached 120-150 in 200 s with its
# start-up (docs/quickstart.md, items 16 and 17). The rest goes to the base stage, where
# shape is learned.
after_sr=120
after_base=$((after_sr + 200))
# A training stage's time guard in minutes: the time left before the deadline less
# `$1` seconds for the phases after it, and never under one minute.
guard_minutes() {
  local left=$((deadline - $(date +%s) - $1))
  [ "$left" -ge 60 ] || left=60
  awk -v s="$left" 'BEGIN { printf "%.1f", s / 60 }'
}
phase_name="start-up"
phase_start=$start
declare -a summary=()
elapsed() { echo $(( $(date +%s) - $1 )); }
end_phase() {
  summary+=("$(printf '  %-36s %5ss' "$phase_name" "$(elapsed "$phase_start")")")
}
phase() {
  [ "$phase_name" = "start-up" ] || end_phase
  phase_name="$1"
  phase_start=$(date +%s)
  echo
  echo "== [$(printf '%4s' "$(elapsed "$start")")s] $1"
}
on_error() {
  local status=$?
  echo >&2
  echo "$me: FAILED in phase '$phase_name' (status $status, after $(elapsed "$start")s)." >&2
  echo "$me: the error is printed above; fix it and rerun the same command to resume" \
       "(finished work in $out is kept)." >&2
  exit "$status"
}
trap on_error ERR
# "<label>: N of M steps", flagging a stage that its time guard stopped early. The steps
# reached are the last checkpoint's; the plan is TRAIN_STEPS of the run's config.gin.
report_steps() {
  local label="$1" dir="$2" reached planned
  reached="$(ls "$dir/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)"
  planned="$(sed -n 's/^TRAIN_STEPS = \([0-9]*\)$/\1/p' "$dir/config.gin" 2>/dev/null | tail -1)"
  if [ -n "$reached" ] && [ -n "$planned" ] && [ "$reached" -lt "$planned" ]; then
    guard_fired=1
    printf '  %-20s %5s of %5s steps   STOPPED EARLY by its time guard\n' "$label" "$reached" "$planned"
  else
    printf '  %-20s %5s of %5s steps\n' "$label" "${reached:-?}" "${planned:-?}"
  fi
}

# ---- 0. environment
phase "0. environment (.venv)"
source launch/venv.sh
bin="$ROOT/.venv/bin"
deadline=$(($(date +%s) + 60 * minutes))  # the budget leaves out the first run's install
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
# Compiled programs are kept, so a second run skips most compilation.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$ROOT/.cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}"
# One simulated CPU device per usable core (a power of two, at most 8), so training and
# sampling are data parallel over the cores: on 2 cores the base step ran 1.3-1.5x faster
# than on one device whose ops are split over the cores by XLA's threads, and 4 or 8
# devices on 2 cores were slower than 2 (docs/benchmarks.md). On a GPU or TPU this only
# shapes the unused CPU backend. An XLA_FLAGS that already sets the count is kept.
if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
  cores="$(nproc)" cpu_devices=1
  while [ $((cpu_devices * 2)) -le "$cores" ] && [ "$cpu_devices" -lt 8 ]; do
    cpu_devices=$((cpu_devices * 2))
  done
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices"
fi
echo "python: $("$bin/python" --version 2>&1); output: $out; XLA_FLAGS: $XLA_FLAGS"

# ---- 1. text encoder
phase "1. text encoder"
if [ -n "$t5" ]; then
  [ -f "$t5/config.json" ] || die "--t5=$t5 is not a T5 directory (no config.json)"
  [ -f "$t5/spiece.model" ] || die "--t5=$t5 has no spiece.model (the T5 tokenizer)"
  t5="$(cd "$t5" && pwd)"
  max_length=32
  echo "using the T5 in $t5"
else
  t5="$out/t5"
  max_length=16   # the longest shapes caption is 10 pieces + EOS with the toy tokenizer
  # grounding.json is written last, so a complete grounded T5 of the requested steps is
  # reused; anything else is rewritten (deterministic: same flags, same bytes).
  done_steps=""
  if [ -f "$t5/grounding.json" ]; then
    done_steps="$("$bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"])' "$t5/grounding.json")"
  fi
  if [ "$grounding_steps" != 0 ] && [ "$done_steps" = "$grounding_steps" ]; then
    echo "reusing $t5"
  else
    "$bin/python" -m imagen_jax.quickstart.text_assets --out="$t5" --grounding_steps="$grounding_steps"
  fi
  if [ "$grounding_steps" = 0 ]; then
    echo "NOTE: this T5 has fixed random weights (--grounding_steps=0): it does not tell the" \
         "U-Net which object goes where; see docs/quickstart.md"
  else
    echo "NOTE: this T5 is not a pretrained language model: random weights, grounded for" \
         "$grounding_steps steps on the shapes training split (no pretrained T5 is downloaded);" \
         "see docs/quickstart.md"
  fi
fi
text_dim="$("$bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["d_model"])' "$t5/config.json")"

# ---- 2. embedding cache
phase "2. caption embeddings (imagen-embed)"
cache="$out/cache"
for split in shapes shapes:held_out; do
  "$bin/imagen-embed" --gin_file=runs/embed.gin --gin.DATASET="'$split'" \
    --gin.CACHE_DIR="'$cache'" --gin.T5_PATH="'$t5'" --gin.MAX_LENGTH="$max_length"
done

# ---- smoke: tiny models, a few steps
base_args=() sr_args=() sample_args=()
prompts="$ROOT/gin_configs/experiments/quickstart_prompts.txt"
if [ "$smoke" = 1 ]; then
  echo "(smoke: tiny models, a few steps)"
  base_args=(--gin.TRAIN_STEPS=4 --gin.BATCH_SIZE=8 --gin.UNet.model_channels=16
             "--gin.UNet.channel_mult=(1, 2)" --gin.UNet.num_res_blocks=1
             "--gin.UNet.attention_resolutions=(8,)" --gin.UNet.head_dim=16
             --gin.train.checkpoint_every=4 --gin.train.log_every=2)
  sr_args=(--gin.TRAIN_STEPS=3 --gin.BATCH_SIZE=8 --gin.EfficientUNet.model_channels=16
           "--gin.EfficientUNet.channel_mult=(1, 2)" "--gin.EfficientUNet.num_res_blocks=(1, 1)"
           --gin.EfficientUNet.head_dim=16 --gin.train.checkpoint_every=3
           --gin.train.log_every=1)
  sample_args=(--gin.base/Stage.num_steps=3 --gin.sr/Stage.num_steps=2)
  # Two one-object and two two-object training prompts, and two held-out ones.
  sed -n '1,2p;13,14p;50,51p' "$prompts" > "$out/smoke_prompts.txt"
  prompts="$out/smoke_prompts.txt"
fi

# ---- 3. base model
phase "3. base model 16x16 (imagen-train)"
guard="$(guard_minutes "$after_base")"
echo "time guard: $guard min (what is left of the $minutes-minute budget, less ${after_base}s for the SR stage, sampling and scoring)"
"$bin/imagen-train" --gin_file=experiments/quickstart_base.gin \
  --gin.MODEL_DIR="'$out/base'" --gin.CACHE_DIR="'$cache'" --gin.TEXT_DIM="$text_dim" \
  --gin.train.max_minutes="$guard" \
  ${base_args[@]+"${base_args[@]}"}

# ---- 4. super-resolution model
phase "4. SR model 16->64 (imagen-train)"
guard="$(guard_minutes "$after_sr")"
echo "time guard: $guard min (what is left of the $minutes-minute budget, less ${after_sr}s for sampling and scoring)"
"$bin/imagen-train" --gin_file=experiments/quickstart_sr.gin \
  --gin.MODEL_DIR="'$out/sr'" --gin.CACHE_DIR="'$cache'" --gin.TEXT_DIM="$text_dim" \
  --gin.train.max_minutes="$guard" \
  ${sr_args[@]+"${sr_args[@]}"}

# ---- 5. sampling
phase "5. sampling (imagen-sample)"
"$bin/imagen-sample" --gin_file=experiments/quickstart_sample.gin \
  --prompts="$prompts" --out_dir="$out/samples" --cache_dir="$cache" \
  --gin.BASE_DIR="'$out/base'" --gin.SR_DIR="'$out/sr'" --gin.T5_PATH="'$t5'" \
  --gin.MAX_LENGTH="$max_length" ${sample_args[@]+"${sample_args[@]}"}

# ---- 6. evaluation
phase "6. ShapesBench (imagen-eval)"
"$bin/imagen-eval" shapesbench --samples="$out/samples"

end_phase
trap - ERR
echo
echo "== quickstart finished in $(elapsed "$start")s"
printf '%s\n' "${summary[@]}"
echo "training steps reached (the scores above are of these models):"
guard_fired=0
report_steps "base model 16x16" "$out/base"
report_steps "SR model 16->64" "$out/sr"
if [ "$guard_fired" = 1 ]; then
  echo "NOTE: a time guard (train.max_minutes) stopped training early on this machine, so" \
       "the models are undertrained and the scores are lower than a full run's. Rerun the" \
       "same command to continue training from the checkpoints (then sampling and scoring" \
       "run again on the continued models)."
fi
echo "samples: $out/samples/grid.png (prompts under each image), stage0/ 16 px, stage1/ 64 px"
echo "scores:  $out/samples/shapesbench.json"
