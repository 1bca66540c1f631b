#!/usr/bin/env bash
# The GPU session in one script: the test suite on the GPU, then perf/report.py in GPU mode.
# Uses the machine's python3 with its preinstalled torch / triton / matplotlib / pytest and
# installs nothing (PYTHONPATH=. stands in for `pip install -e .`). The report runs even if
# tests fail; exit codes go to $OUT/exit_codes.txt, logs to $OUT/*.log, and the report
# folder (perf/results/<gpu name>/) to $OUT/<gpu name>.tar.gz (the device tool brings back
# at most 8 files, so the folder travels as one archive).
#   OUT=/some/dir bash perf/gpu_run.sh [extra perf/report.py options, e.g. --quick]
# Time: the whole script ends within TOTAL_S seconds (default 540, for the device tool's
# 600 s limit per command: a command killed at that limit would lose the archive made at
# the end; with less device time left than that, pass TOTAL_S = time left - 60). The
# tests get at most TEST_TIMEOUT_S (default 240); the report gets what is left less
# ARCHIVE_S (default 45: its 30 s grace after SIGTERM, the archive) as its --budget-s, and
# writes what it has if stopped.
set -u
cd "$(dirname "$0")/.."
START_S=$SECONDS
TOTAL_S="${TOTAL_S:-540}"
ARCHIVE_S="${ARCHIVE_S:-45}"
OUT="${OUT:-perf/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
PY="${PYTHON:-python3}"

{
  echo "== gpu_run.sh $(date -Is) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/gpu_run.log"

echo "== pytest, 5 shards in parallel ($(date -Is))" | tee -a "$OUT/gpu_run.log"
# Most of the GPU test time is Triton compiling kernels on the CPU, one at a time per
# process: five pytest processes (sharing the GPU and the compile cache) use more cores.
# The every-config tests compile ~300 kernels per kernel path: they get shards of their own.
run_shard() {  # name, pytest arguments...
  local name=$1; shift
  timeout -k 15 "${TEST_TIMEOUT_S:-240}" "$PY" -m pytest -q "$@" > "$OUT/pytest_$name.log" 2>&1
  echo $? > "$OUT/.rc_$name"
}
run_shard kernels tests/kernels -k "not fused_every_config" &
run_shard fused_configs tests/kernels -k "fused_every_config" &
run_shard ops_perf tests/ops tests/perf &
run_shard functional tests/test_functional.py &
run_shard parity tests --ignore=tests/kernels --ignore=tests/ops --ignore=tests/perf \
  --ignore=tests/test_functional.py &
wait
TEST_RC=0
for name in kernels fused_configs ops_perf functional parity; do
  rc=$(cat "$OUT/.rc_$name" 2>/dev/null || echo 99); rm -f "$OUT/.rc_$name"
  echo "== pytest[$name] exit code $rc: $(tail -n 1 "$OUT/pytest_$name.log")" | tee -a "$OUT/gpu_run.log"
  [ "$rc" = 0 ] || TEST_RC=$rc
done
cat "$OUT"/pytest_*.log > "$OUT/pytest.log" && rm -f "$OUT"/pytest_*.log

NAME=$("$PY" -c "import sys, torch; sys.path.insert(0, 'perf'); import report; print(report._sanitize(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown_gpu)
REPORT_DIR="perf/results/$NAME"
[ "$NAME" = cpu ] && REPORT_DIR="$OUT/cpu_mode"  # no GPU after all: leave perf/results/cpu alone
# The report's own budget keeps 20 s for its outputs; `timeout` is the backstop.
BUDGET_S=$(( TOTAL_S - (SECONDS - START_S) - ARCHIVE_S ))
[ "$BUDGET_S" -ge 60 ] || BUDGET_S=60
echo "== perf/report.py -> $REPORT_DIR, --budget-s $BUDGET_S ($(date -Is))" | tee -a "$OUT/gpu_run.log"
timeout -k 30 "$(( BUDGET_S + 10 ))" "$PY" perf/report.py --out "$REPORT_DIR" --budget-s "$BUDGET_S" "$@" \
  2>&1 | tee "$OUT/report.log"
REPORT_RC=${PIPESTATUS[0]}
echo "== report exit code $REPORT_RC ($(date -Is))" | tee -a "$OUT/gpu_run.log"

if [ "$NAME" != cpu ] && [ -d "$REPORT_DIR" ]; then
  tar czf "$OUT/$NAME.tar.gz" -C "$(dirname "$REPORT_DIR")" "$(basename "$REPORT_DIR")"
fi
printf 'pytest=%s\nreport=%s\n' "$TEST_RC" "$REPORT_RC" | tee "$OUT/exit_codes.txt"
exit 0
