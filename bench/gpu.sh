#!/usr/bin/env bash
# One command for a CUDA machine: the paper profile (or a projection of it) and the throughput
# benchmarks, in under 10 minutes, results under ${OUT:-bench/results}.
#
#   bash bench/gpu.sh                 # OUT=/some/dir bash bench/gpu.sh to choose the folder
#
# Works offline: packages other than torch may be missing, so wheels in .whl/ (if any) are
# installed first, then this checkout with --no-deps. CIFAR-10 is found as the package finds it
# (PRIVOFFLOAD_DATA, .cache/data, or built from shared/data/ when the checkout carries it); the
# throughput benchmarks fall back to random pixels without it. Each step gets what is left of
# BUDGET_S (default 570 s); a failed step is logged and the next one runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PY:-python}"
BUDGET_S="${BUDGET_S:-570}"
START=$(date +%s)
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then  # a dry run of this script on a CPU: tiny sizes
  PT=(--width 8 --images 128 --batch 32 --obf-batch 16 --test-images 200)
  TT=(--widths 8 --batch 32 --steps 2 --obf-width 8 --obf-batch 16 --rounds 1)
  OL=(--rounds 20 --batch 32)
else
  PT=(--width 64 --images 20000 --batch 512 --obf-batch 512)
  TT=(--widths 16,64 --batch 512 --steps 30 --obf-width 64 --obf-batch 512 --rounds 2)
  OL=(--rounds 100)
fi
FAILED=()

log() { echo "[$(date -u +%FT%TZ) +$(($(date +%s) - START))s] $*" | tee -a "$OUT/gpu.log"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
step() {  # step NAME NEED RESERVE COMMAND...: run with the time left minus RESERVE (kept for later steps)
  local name=$1 need=$2 reserve=$3 t rc=0; shift 3
  t=$(($(left) - reserve))
  if ((t < need)); then log "skip $name: ${t}s left for it, it needs ${need}s"; FAILED+=("$name(skipped)"); return 0; fi
  log "start $name (limit ${t}s): $*"
  timeout "$t" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
  if ((rc == 0)); then log "done $name"; else log "FAILED $name (exit $rc), tail of $OUT/$name.txt:"; tail -n 15 "$OUT/$name.txt" | tee -a "$OUT/gpu.log"; FAILED+=("$name"); fi
  tail -n 25 "$OUT/$name.txt"
}

# ---- the machine
log "privoffload GPU benchmarks, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), OUT=$OUT"
{ date -u; hostname; nvidia-smi || true; nproc; } > "$OUT/machine.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/gpu.log" || true

# ---- packages (offline): wheels from .whl/ first, never torch; then this checkout (INSTALL=0: neither)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # works even when the install below fails
if [ "${INSTALL:-1}" = 0 ]; then
  log "INSTALL=0: nothing installed"
elif [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  wheels=$(ls .whl/*.whl | grep -v -E '/(torch|nvidia_|triton)[-_]' || true)
  [ -n "$wheels" ] && { $PY -m pip install -q --no-deps --no-index $wheels 2>&1 | tail -n 3 || log "some wheels from .whl/ did not install"; }
fi
[ "${INSTALL:-1}" = 0 ] || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3 \
  || log "pip install -e . failed; running from src/"
$PY - <<'PY' 2>&1 | tee -a "$OUT/gpu.log"
import importlib, torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
missing = [m for m in ("numpy", "safetensors", "tomli_w", "typer", "rich", "PIL", "onnxruntime") if importlib.util.find_spec(m) is None]
print("missing python packages:", ", ".join(missing) or "none")
PY
if [ -z "${PRIVOFFLOAD_SHARED:-}" ] && [ -f shared/data/prepare_cifar10.py ]; then export PRIVOFFLOAD_SHARED="$PWD/shared"; fi
$PY -c "from privoffload.data import locate; print('CIFAR-10:', *locate())" 2>&1 | tail -n 1 | tee -a "$OUT/gpu.log" || true

# ---- the FLOP count and the projection of the protocol from measured throughput (about a minute)
step flops 20 0 $PY bench/flops.py --json "$OUT/flops.json"
step protocol_time 60 0 $PY bench/protocol_time.py "${PT[@]}" --json "$OUT/protocol_time.json"

# ---- the paper profile itself, when this checkout has the command; 150 s stay for the benchmarks
if $PY -m privoffload reproduce --help > /dev/null 2>&1; then
  step paper 60 150 $PY -m privoffload reproduce --profile paper --out "$OUT/paper"
else
  log "no 'privoffload reproduce' in this checkout: protocol_time's projection stands in for it"
fi

# ---- throughput side by side with the naive loop, and the client's CPU path
step train_throughput 60 40 $PY bench/train_throughput.py "${TT[@]}" --json "$OUT/train_throughput.json"
step obfuscator_latency 30 0 $PY bench/obfuscator_latency.py --threads 2 "${OL[@]}" --json "$OUT/obfuscator_latency.json"

log "finished in $(($(date +%s) - START))s; results in $OUT"
if ((${#FAILED[@]})); then log "not complete: ${FAILED[*]}"; exit 1; fi
