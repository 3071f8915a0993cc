#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): bounded under 8 minutes on one GPU, one JSON of everything.
#
#   bash benchmarks/gpu_check.sh                        # on a machine with a CUDA GPU
#   GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh  # CPU dry run: every part on the CPU at tiny sizes
#
# Parts (each under its own `timeout`; a failing part is recorded with its exit code and last lines, and the
# others still run):
#   cuda_tests          pytest tests/test_cuda.py (the only tests gated on CUDA)               limit  80 s
#   train_step_b4096    benchmarks.train_step --device cuda, B 4096, K {10, 1000}, H {1, 16}     limit  60 s
#   train_step_b16384   the same at B 16384, plus the 16384:1000:5 memory target                limit 100 s
#   knn_faiss_gpu       benchmarks.gpu_knn: faiss-gpu and torch-cuda k-NN vs the CPU table      limit  50 s
#   digits_fp32         icon fit --config experiments/digits/config.yaml, --trainer.precision 32-true    60 s
#   digits_bf16         the same fit with --trainer.precision bf16-mixed                                 60 s
# The dry run keeps the part names but runs on the CPU at tiny sizes: B 64 / 128, K {10, 1000}, H 1; k-NN on 2,000
# rows (faiss-cpu vs torch); digits for 10 epochs; the CUDA tests are collected and skip.
# Finding the python (with its torch / CUDA probe) takes at most 2 x 30 s. Every part's limit is also capped by
# what is left of GPU_CHECK_BUDGET_S (default 420 s from the start); a part with under 15 s left is skipped
# and says so. Killing takes at most 5 s more, so the whole run stays under 8 minutes.
#
# Python: $PYTHON if set (only that one), else .venv/bin/python if present, then python3. It must import torch
# with CUDA (in the dry run: torch at all); if none does, one line on stderr and exit 2. Optional pieces that
# are missing (pytest, lightning / the `icon` command, faiss or its GPU support, bf16) skip their part or row
# with the reason instead of failing the check.
#
# Results: benchmarks/results/gpu_check_cuda.json (the summary: machine, every part's status, exit code,
# seconds, last lines, the pytest counts, the k-NN agreement, the bf16-vs-fp32 comparison), beside it
# train_step_cuda_B4096.json, train_step_cuda_B16384.json and gpu_knn_cuda.json. The dry run writes
# gpu_check_cpu_dry.json and its parts' files to a temporary folder instead (GPU_CHECK_RESULTS=DIR to choose).
# With $OUT set, the results and the parts' logs are copied there too (after every part).
# GPU_CHECK_PARTS="knn_faiss_gpu digits_bf16" runs only the parts named (the others are recorded as skipped);
# GPU_CHECK_TESTS overrides the test files of cuda_tests; GPU_CHECK_FEATURES the .npz of knn_faiss_gpu.
# Exit status: 0 when no part failed (skips allowed), 1 when one did, 2 when no usable python was found.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
START_S=$(date +%s)
DRY=${GPU_CHECK_ALLOW_CPU:-0}
[[ $DRY == 1 ]] || DRY=0
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
DEADLINE_S=$((START_S + BUDGET_S))
MIN_LEFT_S=15
KILL_AFTER_S=5

# The parts, in the order they run (tests/test_gpu_check.py reads this line).
PARTS=(cuda_tests train_step_b4096 train_step_b16384 knn_faiss_gpu digits_fp32 digits_bf16)
declare -A LIMIT_S=([cuda_tests]=80 [train_step_b4096]=60 [train_step_b16384]=100 [knn_faiss_gpu]=50 [digits_fp32]=60
    [digits_bf16]=60)  # seconds; each also capped by what is left of BUDGET_S

if ! command -v timeout >/dev/null 2>&1; then
    echo "gpu_check: FAILED: the 'timeout' command (coreutils) is missing; nothing was run" >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------ find the python
if [[ -n ${PYTHON:-} ]]; then
    CANDIDATES=("$PYTHON")
else
    CANDIDATES=()
    [[ -x .venv/bin/python ]] && CANDIDATES+=(.venv/bin/python)
    CANDIDATES+=(python3)
fi
PROBE='import sys, torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__ + ("" if cuda else ", no CUDA"))
sys.exit(0 if cuda or sys.argv[1] == "1" else 3)'
PY=""
TRIED=()
for candidate in "${CANDIDATES[@]}"; do
    answer=$(timeout --kill-after=$KILL_AFTER_S 30 "$candidate" -c "$PROBE" "$DRY" 2>/dev/null </dev/null)
    rc=$?
    if [[ $rc == 0 ]]; then
        PY=$candidate
        break
    elif [[ $rc == 3 ]]; then
        TRIED+=("$candidate: ${answer:-torch}: torch.cuda.is_available() is False")
    elif [[ $rc == 124 || $rc == 137 ]]; then
        TRIED+=("$candidate: 'import torch' timed out")
    else
        TRIED+=("$candidate: cannot import torch (exit $rc)")
    fi
done
if [[ -z $PY ]]; then
    tried=$(printf '%s; ' "${TRIED[@]}")
    hint="set PYTHON=/path/to/python, or GPU_CHECK_ALLOW_CPU=1 for the CPU dry run"
    echo "gpu_check: FAILED: no python with torch and CUDA (${tried%; }); $hint" >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------ folders
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    TAG=cpu_dry
    RESULTS=${GPU_CHECK_RESULTS:-$WORK/results}
else
    DEVICE=cuda
    TAG=cuda
    RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}
fi
mkdir -p "$RESULTS" "$WORK/parts" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
SUMMARY=$RESULTS/gpu_check_$TAG.json
echo "gpu_check: python $PY ($answer), mode $TAG, results $RESULTS, work $WORK, budget ${BUDGET_S}s"

# What the python has: versions, optional pieces (each a reason when missing). One JSON object.
ENV_PROBE='import importlib, json, platform, subprocess, sys
import torch
info = {"python": sys.executable, "python_version": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "missing": {}}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_count"] = torch.cuda.device_count()
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
for name in ("pytest", "lightning", "jsonargparse", "scipy", "sklearn", "faiss", "icon_lightning"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "importable")
    except Exception as error:
        info["missing"][name] = f"{type(error).__name__}: {error}".splitlines()[0]
try:
    import faiss
    info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
except Exception:
    pass
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as error:
    info["nvidia_smi"] = f"unavailable: {type(error).__name__}"
print(json.dumps(info))'
timeout --kill-after=$KILL_AFTER_S 30 "$PY" -c "$ENV_PROBE" >"$WORK/env.json" 2>"$WORK/env.err" </dev/null ||
    echo "{\"env_probe_failed\": \"exit $?\"}" >"$WORK/env.json"

missing() {  # the reason the optional module $1 is missing, empty when present
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("missing", {}).get(sys.argv[2], ""))' \
        "$WORK/env.json" "$1" 2>/dev/null
}
env_value() {
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' \
        "$WORK/env.json" "$1" 2>/dev/null
}

# ------------------------------------------------------------------------------------------ summary
# Reads every part's folder and writes the summary JSON (stdlib only; run after every part).
SUMMARISE='import json, os, sys, time, xml.etree.ElementTree as ET
work, summary, tag, start_s, budget_s = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def tail(path, n=25):
    lines = [line.split("\r")[-1].rstrip() for line in read(path).splitlines()]
    return [line[:400] for line in lines if line.strip()][-n:]
def pytest_counts(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["not_passed"] = ["%s::%s" % (c.get("classname"), c.get("name")) for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    reasons = {}
    for c in suite.iter("testcase"):
        s = c.find("skipped")
        if s is not None:
            reason = s.get("message", "")
            reasons[reason] = reasons.get(reason, 0) + 1
    out["skip_reasons"] = reasons
    return out
def train_rows(result):
    def ms(case):
        return case.get("ms", case.get("skipped"))
    return [{"B": r["B"], "K": r["K"], "H": r["H"], "step_ms": ms(r["step"]), "dense_step_ms": ms(r["dense_step"]),
             "loss_ms": ms(r["loss"]), "plain_loss_ms": ms(r["plain_loss"]),
             "step_peak_bytes": r["step"].get("peak_bytes"), "samples_per_s": r.get("samples_per_s"),
             "dense_step_over_step": r.get("dense_step_over_step"), "plain_over_loss": r.get("plain_over_loss")}
            for r in result.get("rows", [])]
def fit_metrics(path):
    m = load(path)
    if m is None:
        return None
    metrics = m.get("metrics", {})
    return {"hungarian_acc": metrics.get("val/hungarian_acc/best"), "nmi": metrics.get("val/nmi"),
            "ari": metrics.get("val/ari"), "train_loss": metrics.get("train/loss"), "steps": m.get("steps"),
            "wall_time_s": m.get("wall_time_s"), "selected_head": m.get("selected_head"),
            "head_losses": m.get("head_losses"), "converged": (m.get("convergence") or {}).get("converged"),
            "config_sha256": m.get("config_sha256")}
parts, details = [], {}
for name in sorted(os.listdir(os.path.join(work, "parts"))):
    d = os.path.join(work, "parts", name)
    name = name.split("_", 1)[1]
    p = {"name": name, "status": read(os.path.join(d, "status"), "running").strip()}
    rc = read(os.path.join(d, "rc")).strip()
    p["exit_code"] = int(rc) if rc else None
    t0, t1 = read(os.path.join(d, "start_ns")).strip(), read(os.path.join(d, "end_ns")).strip()
    p["seconds"] = round((int(t1) - int(t0)) / 1e9, 2) if t0 and t1 else None
    limit = read(os.path.join(d, "limit")).strip()
    p["limit_s"] = int(limit) if limit else None
    for key in ("reason", "command", "result"):
        value = read(os.path.join(d, key)).strip()
        if value:
            p[key] = value
    if p["status"] not in ("passed", "skipped"):
        p["last_lines"] = tail(os.path.join(d, "log"))
    result = load(p["result"]) if "result" in p else None
    if name == "cuda_tests":
        p["pytest"] = pytest_counts(os.path.join(d, "junit.xml"))
    elif name.startswith("train_step") and result:
        p["rows"], p["targets"] = train_rows(result), result.get("targets")
        p["matmul_gflops"] = result.get("matmul_gflops")
    elif name.startswith("knn") and result:
        p["knn"] = {k: result.get(k) for k in ("features", "n", "dim", "k", "reference", "rows", "ok", "failures")}
    elif name.startswith("digits"):
        p["metrics"] = fit_metrics(os.path.join(d, "run", "metrics.json"))
        details[name] = p["metrics"]
    parts.append(p)
fp32, bf16 = details.get("digits_fp32"), details.get("digits_bf16")
comparison = None
if fp32 and bf16:
    comparison = {}
    for key in ("hungarian_acc", "nmi", "ari", "train_loss", "steps", "wall_time_s"):
        a, b = fp32.get(key), bf16.get(key)
        comparison[key] = {"fp32": a, "bf16": b, "bf16_minus_fp32": (b - a) if None not in (a, b) else None}
    comparison["same_selected_head"] = fp32.get("selected_head") == bf16.get("selected_head")
    acc = comparison["hungarian_acc"]["bf16_minus_fp32"]
    comparison["accuracy_within_0.02"] = None if acc is None else abs(acc) <= 0.02
statuses = [p["status"] for p in parts]
failed = [p["name"] for p in parts if p["status"] not in ("passed", "skipped", "running")]
payload = {
    "check": "benchmarks/gpu_check.sh", "mode": tag, "environment": load(os.path.join(work, "env.json")),
    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start_s)),
    "wall_s": round(time.time() - start_s, 1), "budget_s": budget_s,
    "status": "failed" if failed else ("running" if "running" in statuses else
              ("passed_with_skips" if "skipped" in statuses else "passed")),
    "failed_parts": failed, "skipped_parts": [p["name"] for p in parts if p["status"] == "skipped"],
    "parts": parts, "digits_bf16_vs_fp32": comparison,
}
tmp = summary + ".tmp"
with open(tmp, "w") as f:
    json.dump(payload, f, indent=1)
    f.write("\n")
os.replace(tmp, summary)'

RESULT_FILES=("$SUMMARY")
publish() {  # the summary, then a copy of this run's results and logs under $OUT
    "$PY" -c "$SUMMARISE" "$WORK" "$SUMMARY" "$TAG" "$START_S" "$BUDGET_S" ||
        echo "gpu_check: writing the summary failed" >&2
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT/gpu_check_logs"
        for f in "${RESULT_FILES[@]}"; do
            [[ -f $f ]] && cp "$f" "$OUT/"
        done
        for d in "$WORK"/parts/*/; do
            [[ -f $d/log ]] && cp "$d/log" "$OUT/gpu_check_logs/$(basename "$d").log"
            [[ -f $d/run/metrics.json ]] && cp "$d/run/metrics.json" "$OUT/gpu_check_logs/$(basename "$d").metrics.json"
        done
        cp "$WORK/env.json" "$OUT/gpu_check_logs/env.json" 2>/dev/null
    fi
    return 0
}
trap 'echo "gpu_check: interrupted" >&2; publish; exit 130' INT TERM

# ------------------------------------------------------------------------------------------ parts
PART_NO=0
PART_DIR=""
new_part() {  # name: the part's folder, $PART_DIR
    PART_NO=$((PART_NO + 1))
    PART_DIR=$WORK/parts/$(printf '%02d' $PART_NO)_$1
    mkdir -p "$PART_DIR"
}

selected() {  # whether part $1 runs: every part, or those named in GPU_CHECK_PARTS
    [[ -z ${GPU_CHECK_PARTS:-} || " $GPU_CHECK_PARTS " == *" $1 "* ]]
}

skip_part() {  # name reason
    new_part "$1"
    selected "$1" || set -- "$1" "not selected (GPU_CHECK_PARTS=$GPU_CHECK_PARTS)"
    echo skipped >"$PART_DIR/status"
    echo "$2" >"$PART_DIR/reason"
    echo "== $1: skipped: $2"
    publish
}

run_part() {  # name result_file(or -) command...: run under timeout (LIMIT_S[name]); status, exit code, time, log.
    # A result file that is missing after exit 0 fails the part; one under $RESULTS is also copied to $OUT.
    local name=$1 limit=${LIMIT_S[$1]} result=$2
    shift 2
    if ! selected "$name"; then
        skip_part "$name" "not selected"
        return 0
    fi
    new_part "$name"
    local left=$((DEADLINE_S - $(date +%s)))
    if ((left < MIN_LEFT_S)); then
        echo skipped >"$PART_DIR/status"
        echo "total budget spent: ${left}s of GPU_CHECK_BUDGET_S=$BUDGET_S left (< ${MIN_LEFT_S}s)" >"$PART_DIR/reason"
        echo "== $name: skipped (total budget spent)"
        publish
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "$limit" >"$PART_DIR/limit"
    echo "$*" >"$PART_DIR/command"
    if [[ $result != - ]]; then
        echo "$result" >"$PART_DIR/result"
        [[ $result == "$RESULTS"/* ]] && RESULT_FILES+=("$result")
    fi
    echo "running" >"$PART_DIR/status"
    echo "== $name (limit ${limit}s): $*"
    date +%s%N >"$PART_DIR/start_ns"
    timeout --kill-after=$KILL_AFTER_S "$limit" "$@" >"$PART_DIR/log" 2>&1 </dev/null
    local rc=$?
    date +%s%N >"$PART_DIR/end_ns"
    echo "$rc" >"$PART_DIR/rc"
    local status=passed
    if [[ $rc == 124 || $rc == 137 ]]; then
        status=timeout
    elif [[ $rc != 0 ]]; then
        status=failed
    elif [[ $result != - && ! -s $result ]]; then
        status=failed
        echo "exit 0 but no result file $result" >"$PART_DIR/reason"
    fi
    echo "$status" >"$PART_DIR/status"
    echo "   $name: $status (exit $rc, $(($(date +%s) - START_S))s since start)"
    if [[ $status != passed ]]; then
        tail -n 5 "$PART_DIR/log" | tr '\r' '\n' | tail -n 5 | sed 's/^/   | /'
    fi
    publish
}

ICON_MISSING=""
for module in lightning jsonargparse icon_lightning; do
    reason=$(missing $module)
    [[ -n $reason ]] && ICON_MISSING="$module not importable ($reason)" && break
done
CORE_MISSING=$(missing icon_lightning)
[[ -n $CORE_MISSING ]] && CORE_MISSING="icon_lightning not importable ($CORE_MISSING)"

# (a) the CUDA tests (grep -rln 'cuda.is_available' tests: only tests/test_cuda.py is gated on CUDA)
read -r -a CUDA_TESTS <<<"${GPU_CHECK_TESTS:-tests/test_cuda.py}"
if [[ -n $(missing pytest) ]]; then
    skip_part cuda_tests "pytest not importable ($(missing pytest))"
else
    JUNIT=$WORK/parts/$(printf '%02d' $((PART_NO + 1)))_cuda_tests/junit.xml
    run_part cuda_tests - "$PY" -m pytest -p no:cacheprovider -q -rs "--junitxml=$JUNIT" "${CUDA_TESTS[@]}"
fi

# (b) bench-train's CUDA rows: B in {4096, 16384}, K in {10, 1000}, one process per B (a timeout loses one B)
if [[ $DRY == 1 ]]; then
    TRAIN_SMALL=(--batch-sizes 64 --heads 1 --extra "" --matmul-n 256 --budget-s 0.2 --max-repeats 2 --threads 2)
    TRAIN_LARGE=(--batch-sizes 128 --heads 1 --extra "" --matmul-n 256 --budget-s 0.2 --max-repeats 2 --threads 2)
    B_SMALL=64 B_LARGE=128
else
    TRAIN_SMALL=(--batch-sizes 4096 --heads 1,16 --extra "" --budget-s 1 --max-repeats 3)
    TRAIN_LARGE=(--batch-sizes 16384 --heads 1,16 --extra 16384:1000:5 --budget-s 1 --max-repeats 3)
    B_SMALL=4096 B_LARGE=16384
fi
if [[ -n $CORE_MISSING ]]; then
    skip_part train_step_b4096 "$CORE_MISSING"
    skip_part train_step_b16384 "$CORE_MISSING"
else
    out=$RESULTS/train_step_${TAG}_B$B_SMALL.json
    run_part train_step_b4096 "$out" "$PY" -m benchmarks.train_step --device $DEVICE --clusters 10,1000 \
        "${TRAIN_SMALL[@]}" --out "$out"
    out=$RESULTS/train_step_${TAG}_B$B_LARGE.json
    run_part train_step_b16384 "$out" "$PY" -m benchmarks.train_step --device $DEVICE --clusters 10,1000 \
        "${TRAIN_LARGE[@]}" --out "$out"
fi

# (c) k-NN: faiss-gpu (and torch-cuda, faiss-cpu) against the CPU table on the CIFAR-10 test features
KNN_ARGS=()
[[ -n ${GPU_CHECK_FEATURES:-} ]] && KNN_ARGS+=(--features "$GPU_CHECK_FEATURES")
[[ $DRY == 1 ]] && KNN_ARGS+=(--n 2000)
if [[ -n $CORE_MISSING ]]; then
    skip_part knn_faiss_gpu "$CORE_MISSING"
else
    out=$RESULTS/gpu_knn_$TAG.json
    run_part knn_faiss_gpu "$out" "$PY" -m benchmarks.gpu_knn --device $DEVICE "${KNN_ARGS[@]}" --out "$out"
fi

# (d) the digits fit through `icon fit`, fp32 then bf16-mixed, each in its own run folder under $WORK
if [[ $DRY == 1 ]]; then
    FIT_ARGS=(--trainer.accelerator cpu --trainer.max_epochs 10 --trainer.check_val_every_n_epoch 5)
else
    FIT_ARGS=(--trainer.accelerator gpu --trainer.devices 1)
fi
LOGGER='{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}'  # no W&B
fit_digits() {  # name precision
    local name=$1 precision=$2 dir
    if [[ -n $ICON_MISSING ]]; then
        skip_part "$name" "$ICON_MISSING"
    elif [[ $precision == bf16-mixed && $DRY == 0 && $(env_value bf16_supported) != True ]]; then
        skip_part "$name" "torch.cuda.is_bf16_supported() is not True on this GPU"
    else
        dir=$WORK/parts/$(printf '%02d' $((PART_NO + 1)))_$name
        run_part "$name" "$dir/run/metrics.json" "$PY" -m icon_lightning fit --config experiments/digits/config.yaml \
            "${FIT_ARGS[@]}" --trainer.precision "$precision" --trainer.logger "$LOGGER" \
            --data.cache_dir "$WORK/cache" --run_dir "$dir/run"
    fi
}
fit_digits digits_fp32 32-true
fit_digits digits_bf16 bf16-mixed

# ------------------------------------------------------------------------------------------ verdict
trap - INT TERM
publish
"$PY" - "$SUMMARY" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"gpu_check: {s['status']} in {s['wall_s']} s: " + ", ".join(f"{p['name']} {p['status']}" for p in s["parts"]))
c = s.get("digits_bf16_vs_fp32")
if c:
    pairs = [f"{k} {v['bf16']} vs {v['fp32']}" for k, v in c.items() if isinstance(v, dict)]
    print("digits bf16 vs fp32: " + ", ".join(pairs))
print(f"summary: {sys.argv[1]}")
EOF
STATUS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$SUMMARY" 2>/dev/null)
[[ $STATUS == passed || $STATUS == passed_with_skips ]] && exit 0
exit 1
