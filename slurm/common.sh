# Sourced by the slurm/ scripts: environment and dataset checks, train.py flag lookup, job
# submission, and a launcher wrapper that turns SIGTERM into checkpoint-then-requeue.
# Expects REPO (the repository root) to be set by the sourcing script.

die() {
    echo "error: $*" >&2
    exit 2
}

# print_help SCRIPT: the comment block under the script's first line (its usage), without the '# '.
print_help() {
    sed -n '2,/^[^#]/{/^#/{/^#SBATCH/d;s/^# \{0,1\}//;p}}' "$1"
}

if [ -n "${VENV:-}" ]; then
    [ -f "$VENV/bin/activate" ] \
        || die "VENV=$VENV has no bin/activate; set VENV to a virtual environment (or PYTHON=/path/to/venv/bin/python)"
    # Activation scripts are not written for `set -u`.
    set +u
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    set -u
fi
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$REPO/logs}
# torchrun SIGKILLs its workers this many seconds after forwarding SIGTERM (default 30); leave
# train.py most of the 120 s warning (--signal=B:TERM@120) to reach its next checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}

check_env() {
    local script=$1
    command -v "$PYTHON" >/dev/null 2>&1 \
        || die "$script: '$PYTHON' not found; activate the environment or set PYTHON=/path/to/venv/bin/python (or VENV=/path/to/venv)"
    "$PYTHON" -c 'import torch' >/dev/null 2>&1 \
        || die "$script: $PYTHON cannot import torch; run 'pip install -r requirements.txt' in that environment or set PYTHON"
    [ -f "$REPO/train.py" ] || die "$script: $REPO/train.py not found; set REPO=/path/to/the/repository"
}

check_data() {
    local script=$1 data=$2
    [ "$data" = synthetic ] && return 0
    case $data in /*) ;; *) data=$REPO/$data ;; esac
    [ -d "$data/images" ] \
        || die "$script: data folder $2 has no images/; set DATA (or --data) to a folder with images/ and annotations/, or DATA=synthetic"
}

# flag_value FLAG DEFAULT ARGS...: the last value given for FLAG (as "FLAG V" or "FLAG=V"), else DEFAULT.
flag_value() {
    local flag=$1 value=$2
    shift 2
    while [ $# -gt 0 ]; do
        case $1 in
            "$flag")
                if [ $# -ge 2 ]; then value=$2; shift; fi ;;
            "$flag"=*)
                value=${1#*=} ;;
        esac
        shift
    done
    printf '%s\n' "$value"
}

has_flag() {
    local flag=$1 arg
    shift
    for arg in "$@"; do
        case $arg in "$flag" | "$flag"=*) return 0 ;; esac
    done
    return 1
}

# submit SBATCH_ARGS...: submits and prints the bare job id ("--parsable" prints "id" or "id;cluster").
submit() {
    local out
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found; run this on a SLURM login node"
    out=$(sbatch --parsable "$@") || die "sbatch $* failed"
    out=${out%%;*}
    [[ $out =~ ^[0-9]+$ ]] || die "sbatch printed '$out' instead of a job id"
    printf '%s\n' "$out"
}

# Leaves in RESOURCE_OPTIONS the sbatch options for CPUS_PER_TASK and GPUS_PER_NODE, where set. On the
# command line they override the job scripts' #SBATCH lines (sbatch reads no variable for CPUs per
# task), so CPU-only or smaller nodes need no edited copy of the scripts.
resource_options() {
    RESOURCE_OPTIONS=()
    if [ -n "${CPUS_PER_TASK:-}" ]; then
        [[ $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || die "CPUS_PER_TASK=$CPUS_PER_TASK; set it to a number of CPUs (1 or more)"
        RESOURCE_OPTIONS+=(--cpus-per-task="$CPUS_PER_TASK")
    fi
    if [ -n "${GPUS_PER_NODE:-}" ]; then
        [[ $GPUS_PER_NODE =~ ^([A-Za-z0-9_-]+:)?[0-9]+$ ]] \
            || die "GPUS_PER_NODE=$GPUS_PER_NODE; set it to a count (0 on CPU-only nodes) or TYPE:COUNT"
        RESOURCE_OPTIONS+=(--gpus-per-node="$GPUS_PER_NODE")
    fi
}

# prepare_training SCRIPT ARGS...: resolves encoder, data and run directory (flags win over the
# ENCODER, DATA, RUN_DIR environment), checks them, and leaves train.py's arguments in TRAIN_ARGS.
# With DRY_RUN=1 or --dry-run it runs `train.py ... --dry-run` in this process instead of returning.
prepare_training() {
    local script=$1
    shift
    ENCODER=$(flag_value --encoder "${ENCODER:-mit_b3}" "$@")
    DATA=$(flag_value --data "${DATA:-synthetic}" "$@")
    RUN_DIR=$(flag_value --run-dir "${RUN_DIR:-runs/$ENCODER-${SLURM_JOB_ID:-local}}" "$@")
    cd "$REPO"
    check_env "$script"
    check_data "$script" "$DATA"
    TRAIN_ARGS=("$@")
    has_flag --run-dir "$@" || TRAIN_ARGS=(--run-dir "$RUN_DIR" "${TRAIN_ARGS[@]}")
    has_flag --data "$@" || TRAIN_ARGS=(--data "$DATA" "${TRAIN_ARGS[@]}")
    has_flag --encoder "$@" || TRAIN_ARGS=(--encoder "$ENCODER" "${TRAIN_ARGS[@]}")
    if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ -f "$RUN_DIR/last.pt" ] && ! has_flag --resume "$@"; then
        TRAIN_ARGS+=(--resume)
    fi
    if [ "${DRY_RUN:-0}" = 1 ] || has_flag --dry-run "$@"; then
        has_flag --dry-run "$@" || TRAIN_ARGS+=(--dry-run)
        echo "$script: dry run: $PYTHON train.py ${TRAIN_ARGS[*]}" >&2
        exec "$PYTHON" train.py "${TRAIN_ARGS[@]}"
    fi
}

# Copies everything this job prints into RUN_DIR/logs/, next to the checkpoints; requeued runs append.
# Requeue, pre-emption and `scancel --full` signal every process of the job: tee ignores TERM/INT so
# the lines after the signal ("saved last.pt") still reach the logs and this shell gets no SIGPIPE;
# it ends when this shell closes its output.
start_log() {
    mkdir -p "$RUN_DIR/logs"
    exec > >(trap '' TERM INT; exec tee -a "$RUN_DIR/logs/slurm-${SLURM_JOB_ID:-local}.log") 2>&1
    echo "== $(date -Is) job ${SLURM_JOB_ID:-local} on $(hostname) restart ${SLURM_RESTART_COUNT:-0}: train.py ${TRAIN_ARGS[*]}"
}

# torchrun of the checked PYTHON's environment when it is not on PATH.
torchrun_cmd() {
    if [ -n "${TORCHRUN:-}" ]; then
        TORCHRUN_CMD=("$TORCHRUN")
    elif command -v torchrun >/dev/null 2>&1; then
        TORCHRUN_CMD=(torchrun)
    else
        TORCHRUN_CMD=("$PYTHON" -m torch.distributed.run)
    fi
}

gpus_per_node() {
    if [ -n "${NPROC:-}" ]; then
        echo "$NPROC"
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    else
        "$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))'
    fi
}

# run_requeueable CMD...: runs CMD; on SIGTERM (Slurm sends it to this shell only, --signal=B:TERM)
# forwards it so train.py checkpoints and exits, then requeues this job, which restarts with --resume.
# torchrun exits 1 after a SIGTERM even when train.py saved cleanly, so a last.pt written after the
# signal counts as success: the interrupted run ends with 0, not FAILED.
run_requeueable() {
    local status=0 launcher=${1##*/} marker=$RUN_DIR/logs/.sigterm-${SLURM_JOB_ID:-local}
    TERM_RECEIVED=0
    "$@" &
    LAUNCHER_PID=$!
    trap 'TERM_RECEIVED=1; : > "$marker"; kill -TERM "$LAUNCHER_PID" 2>/dev/null || true' TERM
    wait "$LAUNCHER_PID" || status=$?
    if [ "$TERM_RECEIVED" = 1 ]; then
        # The first wait returned because of the signal; this one collects the launcher's exit.
        status=0
        wait "$LAUNCHER_PID" || status=$?
        if [ "$RUN_DIR/last.pt" -nt "$marker" ]; then
            echo "== $(date -Is) SIGTERM: $RUN_DIR/last.pt saved; $launcher exited with $status, the job with 0"
            status=0
        fi
        rm -f "$marker"
    fi
    if [ "$TERM_RECEIVED" = 1 ] && [ "${REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        # The requeue signals the whole job again; this shell only has to exit.
        trap '' TERM
        echo "== $(date -Is) requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue $SLURM_JOB_ID failed (job cancelled?)" >&2
    else
        trap - TERM
    fi
    return "$status"
}
