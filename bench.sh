#!/usr/bin/env bash
# Throughput of every encoder and decoder, and of the training-step ablations, measured through
# `bench.py` (train.py's real training step, no second loop); prints markdown tables, writes bench.json.
#
#   bash bench.sh                                  # 384 px on a GPU, small CPU defaults (~5 min on 2 cores)
#   bash bench.sh --encoders mit_b3,convnext_tiny --decoders unet --steps 100
#   bash bench.sh --quick --encoders mit_b0 --decoders unet
#   bash bench.sh -- --micro-batch 16              # arguments after -- go to every bench.py call
#
# Options [environment variable]:
#   --encoders LIST     [ENCODERS] default convnext_tiny,mit_b3,maxvit_tiny,swin_tiny,coatnet_0 on a GPU,
#                       convnext_tiny,mit_b0 on a CPU
#   --decoders LIST     [DECODERS] default unet,upernet on a GPU; on a CPU unet, plus one upernet
#                       row for the first encoder
#   --img-size S        [IMG_SIZE] one resolution for all rows; default 384 on a GPU, 64 on a CPU
#   --batch-size N      [BATCH] default each encoder's default global batch (and its scaled LR)
#                       on a GPU, 4 on a CPU
#   --steps N           [STEPS] timed steps per row, after bench.py's warm-up; default 50 GPU, 5 CPU
#   --reference         [REFERENCE=1] give each main row a reference row: segmentation_models_pytorch's
#                       Unet (UPerNet) of the same encoder, same size, batch, precision, AdamW and loss,
#                       timed in the same process alternating with ours; the table adds ours/reference.
#                       Default: on when segmentation_models_pytorch imports; --no-reference [REFERENCE=0]
#   --rounds N          [ROUNDS] alternating ours/reference rounds, img/s are medians; default 3
#   --compiled          [COMPILED=1] give each main row a compiled one (--compile: training and
#                       inference torch.compiled, against the same eager reference); default on a
#                       GPU, off on a CPU (minutes of compiling per row there); --no-compiled [COMPILED=0].
#                       `-- --reference-compile` compiles the reference too: every ratio is then to compiled smp
#   --peak-tflops X     [PEAK_TFLOPS] the device's peak TFLOP/s for MFU, passed to bench.py
#   --ablations LIST    [ABLATIONS] any of clip,channels_last,compile,precision, or none; default
#                       all on a GPU, all but compile on a CPU (compile is slow to start there); the
#                       bf16 row is skipped, with the reason, on a CPU without native bf16 (avx512_bf16/amx)
#   --ablate-encoder E  [ABLATE_ENCODER] encoder of the ablation rows; default the first encoder
#   --out FILE          [BENCH_OUT] default bench.json next to this script; rewritten each run,
#                       one JSON object per line: bench.py's fields plus "run" (main or the ablation)
#   --quick             smoke-test sizes on any device: 32 px, batch 2, 2 steps, ablations clip,channels_last
# PYTHON picks the interpreter (default python). Exits 1 when a row failed, after the tables.
set -euo pipefail

die() {
    echo "error: bench.sh: $*" >&2
    exit 2
}

invocation="bash bench.sh${*:+ $*}"
encoders=${ENCODERS:-}
decoders=${DECODERS:-}
img_size=${IMG_SIZE:-}
batch=${BATCH:-}
steps=${STEPS:-}
peak_tflops=${PEAK_TFLOPS:-}
ablations=${ABLATIONS:-}
ablate_encoder=${ABLATE_ENCODER:-}
out=${BENCH_OUT:-}
reference=${REFERENCE:-auto}
compiled=${COMPILED:-auto}
rounds=${ROUNDS:-3}
quick=0
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1; shift; continue ;;
        --reference) reference=1; shift; continue ;;
        --no-reference) reference=0; shift; continue ;;
        --compiled) compiled=1; shift; continue ;;
        --no-compiled) compiled=0; shift; continue ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --encoders | --decoders | --img-size | --batch-size | --steps | --peak-tflops | --ablations | --ablate-encoder | --out | --rounds)
            [ $# -ge 2 ] || die "$1 needs a value" ;;
        *) die "unknown option $1; see bash bench.sh --help" ;;
    esac
    case $1 in
        --encoders) encoders=$2 ;;
        --decoders) decoders=$2 ;;
        --img-size) img_size=$2 ;;
        --batch-size) batch=$2 ;;
        --steps) steps=$2 ;;
        --peak-tflops) peak_tflops=$2 ;;
        --ablations) ablations=$2 ;;
        --ablate-encoder) ablate_encoder=$2 ;;
        --out) out=$2 ;;
        --rounds) rounds=$2 ;;
    esac
    shift 2
done

# Paths given relative to the caller's directory stay valid after the cd below.
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; set PYTHON=/path/to/venv/bin/python"
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
case $out in "" | /*) ;; *) out=$PWD/$out ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")"
out=${out:-$PWD/bench.json}

cuda=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null) \
    || die "$PYTHON cannot import torch; run 'pip install -r requirements.txt' or set PYTHON=/path/to/venv/bin/python"
[ -f bench.py ] || die "bench.py not found in $PWD"

if [ "$quick" = 1 ]; then
    : "${img_size:=32}" "${batch:=2}" "${steps:=2}" "${ablations:=clip,channels_last}"
elif [ "$cuda" = True ]; then
    : "${img_size:=384}" "${steps:=50}" "${ablations:=clip,channels_last,compile,precision}" "${decoders:=unet,upernet}"
else
    : "${img_size:=64}" "${batch:=4}" "${steps:=5}" "${ablations:=clip,channels_last,precision}"
    : "${encoders:=convnext_tiny,mit_b0}"
fi
: "${encoders:=convnext_tiny,mit_b3,maxvit_tiny,swin_tiny,coatnet_0}"
case $reference in
    auto) if "$PYTHON" -c 'import segmentation_models_pytorch' >/dev/null 2>&1; then reference=1; else reference=0; fi ;;
    1)  "$PYTHON" -c 'import segmentation_models_pytorch' >/dev/null 2>&1 \
            || die "--reference needs segmentation_models_pytorch; run 'pip install -r requirements-dev.txt'" ;;
    0) ;;
    *) die "REFERENCE must be auto, 1 or 0" ;;
esac

case $compiled in
    auto) [ "$cuda" = True ] && compiled=1 || compiled=0 ;;
    0 | 1) ;;
    *) die "COMPILED must be auto, 1 or 0" ;;
esac

# The header: what the numbers depend on. Native bf16 on a CPU means avx512_bf16 or AMX (Linux flags).
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
cpu_flags=" $(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1) "
has() { case $cpu_flags in *" $1 "*) echo yes ;; *) echo no ;; esac; }
native_bf16=no
[ "$(has avx512_bf16)" = no ] && [ "$(has amx_bf16)" = no ] || native_bf16=yes
torch_info=$(env "$PYTHON" -c 'import torch; print(torch.__version__, torch.get_num_threads())')
header="CPU: ${cpu_model:-unknown} ($(getconf _NPROCESSORS_ONLN 2>/dev/null || echo ?) logical CPUs); avx2 $(has avx2), avx512f $(has avx512f)"
header+=", avx512_bf16 $(has avx512_bf16), amx_bf16 $(has amx_bf16), native bf16 $native_bf16;"
header+=" torch ${torch_info% *}, intra-op threads ${torch_info#* }${OMP_NUM_THREADS:+ (OMP_NUM_THREADS=$OMP_NUM_THREADS)}"
header+="; GPU: $([ "$cuda" = True ] && "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' || echo none)"
skipped=()

IFS=, read -r -a encoder_list <<< "$encoders"
[ ${#encoder_list[@]} -gt 0 ] || die "--encoders is empty"
rows=()
if [ -n "$decoders" ]; then
    IFS=, read -r -a decoder_list <<< "$decoders"
    for encoder in "${encoder_list[@]}"; do
        for decoder in "${decoder_list[@]}"; do rows+=("$encoder $decoder"); done
    done
else
    for encoder in "${encoder_list[@]}"; do rows+=("$encoder unet"); done
    rows+=("${encoder_list[0]} upernet")
fi
ablate_encoder=${ablate_encoder:-${encoder_list[0]}}
ablate_decoder=unet
[ -z "$decoders" ] || ablate_decoder=${decoder_list[0]}

common=(--data synthetic --preload all --img-size "$img_size" --bench-steps "$steps")
main_extra=()
[ "$reference" = 0 ] || main_extra=(--reference --bench-rounds "$rounds")
[ -z "$batch" ] || common+=(--batch-size "$batch")
[ -z "$peak_tflops" ] || common+=(--peak-tflops "$peak_tflops")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$out"
failures=()
count=0

# run_bench RUN ENCODER DECODER [train.py flags...]: one row, appended to $out tagged with RUN.
run_bench() {
    local run=$1 encoder=$2 decoder=$3 part log
    shift 3
    count=$((count + 1))
    part=$work/row-$count.json
    log=$work/row-$count.log
    echo "bench: [$count] $run $encoder/$decoder $img_size px${*:+ $*}" >&2
    if "$PYTHON" bench.py "${common[@]}" --encoder "$encoder" --decoder "$decoder" \
        --bench-out "$part" "$@" "${extra[@]}" > "$log" 2>&1 && [ -s "$part" ]; then
        sed "s/^{/{\"run\": \"$run\", /" "$part" >> "$out"
    else
        failures+=("$run $encoder/$decoder")
        echo "bench: FAILED $run $encoder/$decoder; the end of its output:" >&2
        tail -n 20 "$log" >&2
    fi
}

# field_of RUN ENCODER DECODER FIELD: FIELD of that row in $out, empty when there is none.
field_of() {
    "$PYTHON" - "$out" "$@" <<'PY'
import json, sys
path, run, encoder, decoder, field = sys.argv[1:]
for line in open(path):
    row = json.loads(line)
    if (row.get("run"), row.get("encoder"), row.get("decoder")) == (run, encoder, decoder):
        print(row.get(field, ""))
        break
PY
}

for row in "${rows[@]}"; do
    # shellcheck disable=SC2086
    run_bench main $row "${main_extra[@]}"
    # shellcheck disable=SC2086
    [ "$compiled" = 0 ] || run_bench compiled $row --compile "${main_extra[@]}"
done

if [ "$ablations" != none ]; then
    base_precision=$(field_of main "$ablate_encoder" "$ablate_decoder" precision)
    if [ -z "$base_precision" ]; then
        run_bench baseline "$ablate_encoder" "$ablate_decoder"
        base_precision=$(field_of baseline "$ablate_encoder" "$ablate_decoder" precision)
    fi
    IFS=, read -r -a ablation_list <<< "$ablations"
    for ablation in "${ablation_list[@]}"; do
        case $ablation in
            clip) run_bench clip "$ablate_encoder" "$ablate_decoder" --clip 1.0 ;;
            channels_last) run_bench no-channels-last "$ablate_encoder" "$ablate_decoder" --no-channels-last ;;
            compile)
                if [ "$compiled" = 1 ]; then
                    skipped+=("compile ablation row skipped: every main row has its compiled row above")
                else
                    run_bench compile "$ablate_encoder" "$ablate_decoder" --compile
                fi ;;
            precision)
                for precision in bf16 fp32; do
                    if [ "$precision" = bf16 ] && [ "$cuda" != True ] && [ "$native_bf16" = no ]; then
                        skipped+=("bf16 row skipped: this CPU has no native bf16 (no avx512_bf16, no amx_bf16 flag),
so bf16 autocast is emulated and measured 10-13x slower than fp32; it says nothing about bf16 hardware")
                        continue
                    fi
                    [ "$precision" = "$base_precision" ] \
                        || run_bench "$precision" "$ablate_encoder" "$ablate_decoder" --precision "$precision"
                done ;;
            *) die "--ablations: unknown '$ablation'; choose from clip,channels_last,compile,precision or none" ;;
        esac
    done
fi

"$PYTHON" - "$out" "$invocation" "$header" "${skipped[@]}" <<'PY'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
invocation, header, skipped = sys.argv[2], sys.argv[3], sys.argv[4:]
print(header + "\n")


def cell(row, key, digits=1, scale=1.0):
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value * scale:,.{digits}f}"


def table(header, lines):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print()


main = [r for r in rows if r["run"] in ("main", "compiled")]
if main:
    devices = sorted({str(r.get("device", "?")) for r in main})
    print(f"`{invocation}` on {', '.join(devices)}: synthetic data, {main[0].get('img_size')} px")
    referenced = any("ref_encoder" in r for r in main)
    if referenced:
        print(f"(reference rows: segmentation_models_pytorch, same size/batch/precision/AdamW/loss, alternating "
              f"with ours in one process, medians of {main[0].get('rounds')} rounds; x ref = ours / reference)")
    print()
    lines = []
    for r in main:
        line = [r["encoder"], r["decoder"], cell(r, "batch", 0), cell(r, "precision"), cell(r, "compile"),
                cell(r, "train_img_s"), cell(r, "infer_img_s"), cell(r, "peak_mem_mb", 0),
                cell(r, "params_m"), cell(r, "gflops"), cell(r, "mfu", 1, 100.0), cell(r, "loader_img_s", 0)]
        if referenced:
            line += [cell(r, "train_x_ref", 2), cell(r, "infer_x_ref", 2)]
        lines.append(line)
        if referenced and "ref_encoder" in r:
            decoder = {"unet": "Unet", "upernet": "UPerNet"}.get(r["decoder"], r["decoder"])
            if r.get("ref_train_img_s") is None:
                lines.append([f"ref smp {r['ref_encoder']}", f"smp {decoder}", cell(r, "batch", 0),
                              cell(r, "precision"), "False", r.get("ref_note", "n/a")] + ["n/a"] * 8)
            else:
                lines.append([f"ref smp {r['ref_encoder']}", f"smp {decoder}", cell(r, "batch", 0),
                              cell(r, "precision"), str(r.get("ref_compile", False)), cell(r, "ref_train_img_s"),
                              cell(r, "ref_infer_img_s"), "-",
                              cell(r, "ref_params_m"), "-", "-", "-", "1.00", "1.00"])
    table(["encoder", "decoder", "batch", "precision", "compile", "train img/s", "infer img/s", "peak MB",
           "params M", "GFLOPs/img", "MFU %", "loader img/s"] + (["train x ref", "infer x ref"] if referenced else []),
          lines)

ablated = [r for r in rows if r["run"] not in ("main", "compiled")]
if ablated:
    first = ablated[0]
    base = next((r for r in rows if r["run"] in ("main", "baseline")
                 and (r["encoder"], r["decoder"]) == (first["encoder"], first["decoder"])), None)
    lines = [base] if base and base["run"] == "main" else []
    lines += ablated
    print(f"Ablations on {first['encoder']}/{first['decoder']} (baseline: train.py defaults)\n")

    def speed(r):
        if not base or not base.get("train_img_s") or r.get("train_img_s") is None:
            return "-"
        return f"{r['train_img_s'] / base['train_img_s']:.2f}"

    table(["run", "precision", "channels_last", "compile", "clip", "train img/s", "x baseline",
           "infer img/s", "peak MB"],
          [["baseline" if r is base else r["run"], cell(r, "precision"), cell(r, "channels_last"),
            cell(r, "compile"), cell(r, "clip"), cell(r, "train_img_s"), speed(r),
            cell(r, "infer_img_s"), cell(r, "peak_mem_mb", 0)] for r in lines])
for reason in skipped:
    print(reason.replace("\n", " ") + "\n")
PY
echo "bench: wrote $out" >&2

if [ ${#failures[@]} -gt 0 ]; then
    (IFS=,; echo "bench: ${#failures[@]} row(s) failed:${failures[*]/#/ }" >&2)
    exit 1
fi
