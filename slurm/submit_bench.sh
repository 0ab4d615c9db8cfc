#!/usr/bin/env bash
# Submits a grid of train.py runs over every fold as one chain of sequential jobs (each waits for the
# previous one with afterok, so no two runs share GPUs or a node's memory bandwidth), then one job
# that compares the whole grid (compare.py: <bench-dir>/comparison/comparison.md, .csv, .tex, .json, .png).
#
#   slurm/submit_bench.sh [train.py flags...]        a flag whose value holds '|' is an axis of the grid
#   slurm/submit_bench.sh --data data/artefact --epochs 50                  (3 encoders x 3 folds)
#   slurm/submit_bench.sh --encoder mit_b3 --loss 'dice|dicefocal' --class-weights 'none|inverse_sqrt_log_scaled'
#   slurm/submit_bench.sh --split material ...       one fold per material, named after it
#   slurm/submit_bench.sh --full-res ...             each run also scores its checkpoint at full resolution
#   slurm/submit_bench.sh --list ...                 print the runs and jobs, submit nothing (needs no sbatch)
#
# The grid is grid.py's (python grid.py --list ... runs the same grid here, one run after another, without
# Slurm). Without --encoder the encoders are ENCODERS (default "convnext_tiny mit_b3 maxvit_tiny"), without
# --folds a kfold split has FOLDS (default 3); BENCH_DIR (default runs/bench) holds the run folders
# (<axis values>/fold<k>). Each run uses its encoder's default batch and scaled LR unless --batch-size says.
# A failed job cancels the rest of the chain (--kill-on-invalid-dep). Works from any directory; Slurm logs
# go to LOG_DIR (default <repo>/logs). DRY_RUN=1 makes every job only resolve its config. CPUS_PER_TASK
# and GPUS_PER_NODE replace train.sbatch's 16 CPUs and 2 GPUs per run. Partition, account and similar
# come from sbatch's own environment (SBATCH_PARTITION=gpu, SBATCH_ACCOUNT=proj, SBATCH_TIMELIMIT=12:00:00 ...).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
source "$REPO/slurm/common.sh"

if has_flag --help "$@" || has_flag -h "$@"; then
    print_help "${BASH_SOURCE[0]}"
    exit 0
fi
list=0
grid_args=()
for arg in "$@"; do
    if [ "$arg" = --list ]; then list=1; else grid_args+=("$arg"); fi
done
read -r -a encoders <<< "${ENCODERS:-convnext_tiny mit_b3 maxvit_tiny}"
folds=${FOLDS:-3}
bench_dir=${BENCH_DIR:-runs/bench}
[[ $folds =~ ^[0-9]+$ ]] && [ "$folds" -ge 2 ] || die "submit_bench.sh: FOLDS=$folds; set FOLDS to 2 or more"
! has_flag --grid-dir "$@" || die "submit_bench.sh: the runs go to BENCH_DIR (default runs/bench); set BENCH_DIR instead of --grid-dir"
has_flag --encoder "$@" || grid_args=(--encoder "$(IFS='|'; echo "${encoders[*]}")" ${grid_args[@]+"${grid_args[@]}"})
has_flag --folds "$@" || grid_args+=(--folds "$folds")

cd "$REPO"
check_env submit_bench.sh
check_data submit_bench.sh "$(flag_value --data "${DATA:-synthetic}" "$@")"
# One shell-quoted line per run: its folder, then train.py's arguments; a bad flag stops here with one line.
plan=$("$PYTHON" grid.py --emit --grid-dir "$bench_dir" "${grid_args[@]}") || exit 2
[ "$list" = 1 ] || mkdir -p "$LOG_DIR"
resource_options

previous=""
run_dirs=()
while IFS= read -r line; do
    eval "job=($line)"
    run_dir=${job[0]}
    run_dirs+=("$run_dir")
    after=()
    [ -z "$previous" ] || after=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    # The job name is part of the log file's name (%x): no slashes.
    name=${run_dir#"$bench_dir"/}
    options=(${RESOURCE_OPTIONS[@]+"${RESOURCE_OPTIONS[@]}"} ${after[@]+"${after[@]}"}
             --job-name="bench-${name//\//-}" --output="$LOG_DIR/%x-%j.out")
    if [ "$list" = 1 ]; then
        echo "would submit: sbatch ${options[*]} slurm/train.sbatch ${job[*]:1}"
        previous=JOB
        continue
    fi
    previous=$(submit "${options[@]}" slurm/train.sbatch "${job[@]:1}")
    echo "submitted $run_dir as job $previous"
done <<< "$plan"
compare=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes --job-name=bench-compare
         --output="$LOG_DIR/%x-%j.out" slurm/compare.sbatch --out "$bench_dir/comparison" "${run_dirs[@]}")
if [ "$list" = 1 ]; then
    echo "would submit: sbatch ${compare[*]}"
    echo "${#run_dirs[@]} runs and the comparison; nothing submitted (--list)"
    exit 0
fi
compare_id=$(submit "${compare[@]}")
echo "submitted the comparison of ${#run_dirs[@]} runs as job $compare_id -> $bench_dir/comparison/comparison.md"
