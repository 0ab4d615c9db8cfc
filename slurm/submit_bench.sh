#!/usr/bin/env bash
# Submits the fair benchmark: each encoder × each fold as a chain of sequential 2-GPU jobs
# (every job waits for the previous one with afterok, so no two runs share GPUs or a node's
# memory bandwidth), then one summary job writing runs/bench/<encoder>/summary.md per encoder.
#
#   slurm/submit_bench.sh [train.py flags...]
#   slurm/submit_bench.sh --data data/artefact --epochs 50
#
# ENCODERS (default "convnext_tiny mit_b3 maxvit_tiny"), FOLDS (default 3) and BENCH_DIR
# (default runs/bench) change the grid. Each run uses its encoder's default batch and scaled LR.
# A failed job cancels the rest of the chain (--kill-on-invalid-dep). Works from any directory;
# Slurm logs go to LOG_DIR (default <repo>/logs). DRY_RUN=1 makes every job only resolve its config.
# CPUS_PER_TASK and GPUS_PER_NODE replace train.sbatch's 16 CPUs and 2 GPUs per run. Partition,
# account and similar come from sbatch's own environment (SBATCH_PARTITION=gpu, SBATCH_ACCOUNT=proj,
# SBATCH_TIMELIMIT=12:00:00 ...).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
source "$REPO/slurm/common.sh"

read -r -a encoders <<< "${ENCODERS:-convnext_tiny mit_b3 maxvit_tiny}"
folds=${FOLDS:-3}
bench_dir=${BENCH_DIR:-runs/bench}
[[ $folds =~ ^[0-9]+$ ]] && [ "$folds" -ge 2 ] || die "submit_bench.sh: FOLDS=$folds; set FOLDS to 2 or more"
! has_flag --encoder "$@" || die "submit_bench.sh: --encoder is set per job; choose encoders with ENCODERS=\"a b c\""

cd "$REPO"
check_env submit_bench.sh
check_data submit_bench.sh "$(flag_value --data "${DATA:-synthetic}" "$@")"
mkdir -p "$LOG_DIR"
resource_options

previous=""
cv_dirs=()
for encoder in "${encoders[@]}"; do
    cv_dirs+=("$bench_dir/$encoder")
    for ((fold = 0; fold < folds; fold++)); do
        after=()
        [ -z "$previous" ] || after=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
        previous=$(submit "${RESOURCE_OPTIONS[@]}" "${after[@]}" \
            --job-name="bench-$encoder-fold$fold" --output="$LOG_DIR/%x-%j.out" \
            slurm/train.sbatch --encoder "$encoder" --fold "$fold" --folds "$folds" \
            --run-dir "$bench_dir/$encoder/fold$fold" "$@")
        echo "submitted $encoder fold $fold as job $previous"
    done
done
summary_id=$(submit --dependency="afterok:$previous" --kill-on-invalid-dep=yes \
    --job-name=bench-summary --output="$LOG_DIR/%x-%j.out" slurm/summary.sbatch "${cv_dirs[@]}")
echo "submitted the summary as job $summary_id -> $bench_dir/<encoder>/summary.md"
