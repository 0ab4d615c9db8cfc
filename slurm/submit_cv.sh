#!/usr/bin/env bash
# Submits a k-fold cross-validation: one array task per fold (cv.sbatch), then a job that waits
# for all of them (afterok) and writes the mean ± std table to runs/cv-<encoder>/summary.md.
#
#   slurm/submit_cv.sh ENCODER [FOLDS] [train.py flags...]
#   slurm/submit_cv.sh mit_b3 3 --data data/artefact --epochs 50
#
# FOLDS defaults to 3. Works from any directory; jobs run in the repository and their Slurm logs
# go to LOG_DIR (default <repo>/logs). DRY_RUN=1 makes every job only resolve its config.
# CPUS_PER_TASK and GPUS_PER_NODE (e.g. 4 and 0 on CPU-only nodes) replace cv.sbatch's 16 CPUs and
# 2 GPUs per fold. Partition, account and similar come from sbatch's own environment
# (SBATCH_PARTITION=gpu, SBATCH_ACCOUNT=proj, SBATCH_TIMELIMIT=12:00:00 ...).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
source "$REPO/slurm/common.sh"

if has_flag --help "$@" || has_flag -h "$@"; then
    print_help "${BASH_SOURCE[0]}"
    exit 0
fi
[ $# -ge 1 ] && [[ $1 != -* ]] || die "submit_cv.sh: usage: slurm/submit_cv.sh ENCODER [FOLDS] [train.py flags...]"
encoder=$1
shift
folds=3
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    folds=$1
    shift
fi
[ "$folds" -ge 2 ] || die "submit_cv.sh: FOLDS=$folds; cross-validation needs at least 2 folds"
cv_dir=${CV_DIR:-runs/cv-$encoder}

cd "$REPO"
check_env submit_cv.sh
check_data submit_cv.sh "$(flag_value --data "${DATA:-synthetic}" "$@")"
mkdir -p "$LOG_DIR"
resource_options

array_id=$(submit "${RESOURCE_OPTIONS[@]}" --array="0-$((folds - 1))" --job-name="cv-$encoder" \
    --output="$LOG_DIR/%x-%A_%a.out" --export="ALL,CV_DIR=$cv_dir" slurm/cv.sbatch --encoder "$encoder" --folds "$folds" "$@")
summary_id=$(submit --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    --job-name="cv-$encoder-summary" --output="$LOG_DIR/%x-%j.out" slurm/summary.sbatch "$cv_dir")
echo "submitted folds 0-$((folds - 1)) as array job $array_id and the summary as job $summary_id -> $cv_dir/summary.md"
