#!/usr/bin/env bash
# The one-shot device check: run once on a machine with a GPU, commit its report.
#
#     bash benchmarks/device_check.sh [OUT]        # default OUT: benchmarks/results/device
#     bash benchmarks/device_check.sh --dry-run [OUT]   # the same steps on this CPU, tiny (CI runs it)
#
# Needs posenc's requirements installed (no dataset: every batch is synthetic). Steps, each under its
# own time limit, in order of importance; a step that fails or runs out of time is reported and the
# next one runs:
#   1. pytest -m accelerator: the attention implementations against each other in float32 and
#      bfloat16 (cuDNN's fused kernel where it applies), one train step per task, KV-cache decoding,
#      a sharded restore with transfer (tests/test_accelerator.py);
#   2. python -m benchmarks.speed --profile gpu, one section at a time: ViT-B/16 at 224 and 384 px and
#      GPT-2 small at 1,024 tokens for none, learned, rope, rope_mixed, alibi and rel_bias (items/s,
#      MFU of the datasheet peak, compile time, memory, which attention kernel ran), the timm / linen
#      headline, restore with transfer, evaluation at other sizes.
# Writes OUT/device_check.md (the steps, their status and times), OUT/pytest.log, OUT/speed.log and
# OUT/speed_gpu.{md,json,png} (OUT/speed.{md,json,png} for the dry run's quick profile).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-benchmarks/results/device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
REPORT="$OUT/device_check.md"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  PYTEST_ARGS=(-k auto_chooses)  # the plumbing only: CI runs the whole file in the suite
  SPEED=(--quick --synthetic)
  LIMITS=(tests=300 vit=120 gpt=120 headline=120 restore=120 eval=120)
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  PYTEST_ARGS=()
  SPEED=(--profile gpu --rounds 5)
  LIMITS=(tests=150 vit=140 gpt=90 headline=80 restore=35 eval=35)
fi
limit() { for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

{
  echo "# Device check"
  echo
  echo "\`bash benchmarks/device_check.sh$([ "$DRY" = 1 ] && echo " --dry-run")\`, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
  echo '```'
  (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi")
  python3 - <<'EOF' 2>&1
import platform, jax, jaxlib, flax, optax, orbax.checkpoint as ocp, numpy
print(f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}, orbax-checkpoint {ocp.__version__}, numpy {numpy.__version__}")
print("devices:", jax.devices())
EOF
  echo '```'
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
} > "$REPORT"

step() {  # step NAME LIMIT LOG COMMAND...: run it under its time limit, add a row to the report
  local name="$1" seconds="$2" log="$3" start status
  shift 3
  start=$(date +%s)
  echo "== $name (limit ${seconds}s)" | tee -a "$log"
  timeout --signal=TERM --kill-after=10 "$seconds" "$@" >> "$log" 2>&1
  status=$?
  case $status in
    0) status="passed" ;;
    124|137) status="**timed out** (limit ${seconds} s)" ;;
    *) status="**failed** (exit $status; see $(basename "$log"))" ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - start )) |" | tee -a "$REPORT"
}

step "pytest -m accelerator" "$(limit tests)" "$OUT/pytest.log" \
  python3 -m pytest -q -n 0 -m accelerator -p no:cacheprovider tests/test_accelerator.py "${PYTEST_ARGS[@]}"
for section in vit gpt headline restore eval; do
  step "benchmarks.speed ${SPEED[*]} --sections $section" "$(limit "$section")" "$OUT/speed.log" \
    python3 -m benchmarks.speed "${SPEED[@]}" --sections "$section" --out "$OUT"
done

{
  echo
  echo "## pytest"
  echo
  echo '```'
  grep -E "passed|failed|error|FAILED|ERROR" "$OUT/pytest.log" | tail -n 20
  echo '```'
} >> "$REPORT"
cat "$REPORT"
