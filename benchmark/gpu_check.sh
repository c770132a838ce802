#!/usr/bin/env bash
# The GPU check (issue 19): one command, at most 8 minutes on one GPU, on the GPU machine as it comes (no
# network, its own Python 3.12 with torch 2.11). Carry the working tree and .whl/ (bash benchmark/gpu_wheels.sh
# makes it here), then:
#
#     bash benchmark/gpu_check.sh OUT_DIR                 # the GPU
#     bash benchmark/gpu_check.sh OUT_DIR --cpu-dry-run   # the same steps here on the CPU, tiny models (CI)
#
# Step 0, here: the wheels of .whl/ into a directory of their own, put on PYTHONPATH (that machine's
# site-packages may be read-only); the dry run installs them for Python 3.12 into a directory it does not
# use (they are cp312 wheels), which checks that they install. Steps 1-3 are benchmark/gpu_check.py's:
# the environment, `pytest -m cuda tests`, the throughput at --n-layer 2 and 18. OUT_DIR/gpu_check.json
# holds the results, OUT_DIR/gpu_check.log all the output. No step stops the others; the exit status is 1
# if any failed. PYTHON (default python3, or .venv/bin/python where there is one) runs everything.
#
# Before anything runs, OUT_DIR and the GPU_CHECK_* settings are checked (gpu_check.py --check-only): a link,
# a file, a folder that cannot be written into, a link or a folder at a result's name, a setting out of its
# bounds is one `error:` line and exit status 2. The check writes into a fresh folder of its own,
# OUT_DIR/.gpu_check.XXXXXX (its name is the log's first line); once it has finished, its results replace the
# earlier ones together (renamed into OUT_DIR, no link followed, members of the earlier set it lacks removed).
# A check that did not finish (killed, a crash) leaves the earlier results as they were and its own in that folder.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash benchmark/gpu_check.sh OUT_DIR [--cpu-dry-run]" >&2
  exit 2
fi
OUT="$1"
shift
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY_RUN=1 ;;
    *) echo "error: unknown argument $arg (usage: bash benchmark/gpu_check.sh OUT_DIR [--cpu-dry-run])" >&2; exit 2 ;;
  esac
done
export GPU_CHECK_START="${GPU_CHECK_START:-$(date +%s)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYGAME_HIDE_SUPPORT_PROMPT=1

# ---- before anything runs: OUT_DIR and the settings ----------------------------------------------------------
check=("$PYTHON" benchmark/gpu_check.py --check-only "$OUT")
[ "$DRY_RUN" = 1 ] && check+=(--cpu-dry-run)
"${check[@]}"
rc=$?
if [ $rc -ne 0 ]; then
  [ $rc -eq 2 ] || echo "error: $PYTHON cannot run benchmark/gpu_check.py (exit $rc)" >&2
  exit 2
fi
if [ -n "${GPU_CHECK_SITE:-}" ] && { [ -L "$GPU_CHECK_SITE" ] || { [ -e "$GPU_CHECK_SITE" ] && [ ! -d "$GPU_CHECK_SITE" ]; }; }; then
  echo "error: GPU_CHECK_SITE $GPU_CHECK_SITE is a link or not a folder; the wheels are installed into a folder" >&2
  exit 2
fi
mkdir -p "$OUT" && STAGE="$(mktemp -d "$OUT/.gpu_check.XXXXXX")" || { echo "error: cannot write into $OUT" >&2; exit 2; }
exec 3>&1 4>&2
exec > >(tee "$STAGE/gpu_check.log") 2>&1
TEE_PID=$!
echo "gpu_check: writing into $STAGE, moved into $OUT when the check has finished"
echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $PYTHON, out $OUT, dry run $DRY_RUN"

# ---- step 0: the wheels ----------------------------------------------------------------------------------
# a fresh temporary directory, or GPU_CHECK_SITE (pip --upgrade replaces what an earlier check left there)
SITE="${GPU_CHECK_SITE:-}"
[ -n "$SITE" ] || { SITE="$(mktemp -d -t helm-site.XXXXXX)" && TEMP_SITE="$SITE"; }
t0=$(date +%s)
install_ok=true
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  detail="no .whl/: nothing installed (bash benchmark/gpu_wheels.sh makes it)"
elif [ "$DRY_RUN" = 1 ]; then
  if "$PYTHON" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any "${wheels[@]}" \
      2> >(grep -v "^WARNING: Location 'file:" >&2); then
    detail="dry run: ${#wheels[@]} wheels install for CPython 3.12 into $SITE (not put on the path)"
  else
    install_ok=false
    detail="dry run: the wheels do not install for CPython 3.12"
  fi
else
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" ||
      install_ok=false
    how="pip install --target"
  else  # no pip: a wheel is a zip archive laid out for site-packages
    for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$SITE" || install_ok=false; done
    how="unzipped (no pip)"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  detail="${#wheels[@]} wheels into $SITE ($how), on PYTHONPATH"
  $install_ok || detail="failed: $detail"
fi
echo "gpu_check: step install: $detail"
GPU_CHECK_INSTALL="$("$PYTHON" -c 'import json, sys; print(json.dumps({"ok": sys.argv[1] == "true", "detail": sys.argv[2], "wheels": sys.argv[4:], "seconds": float(sys.argv[3])}))' \
  "$install_ok" "$detail" "$(($(date +%s) - t0))" "${wheels[@]##*/}")" || GPU_CHECK_INSTALL='{"ok": false, "detail": "python does not run"}'
export GPU_CHECK_INSTALL

# ---- steps 1-3 ---------------------------------------------------------------------------------------------
args=("$STAGE")
[ "$DRY_RUN" = 1 ] && args+=(--cpu-dry-run)
"$PYTHON" benchmark/gpu_check.py "${args[@]}"
status=$?
finished=false
"$PYTHON" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("finished") is not True)' \
  "$STAGE/gpu_check.json" 2>/dev/null && finished=true
$finished || echo "gpu_check: benchmark/gpu_check.py did not finish (exit $status)"
[ -n "${TEMP_SITE:-}" ] && rm -rf "$TEMP_SITE"
exec >&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2>/dev/null  # the log is whole from here on

# ---- the results: replaced together, once the check has finished -------------------------------------------
if ! $finished; then
  echo "gpu_check: the check did not finish: what it got is in $STAGE; the results in $OUT are as they were" >&2
  exit 1
fi
shopt -s nullglob
new=("$STAGE"/*)
for f in "${new[@]}"; do
  target="$OUT/${f##*/}"
  if [ -L "$target" ] || { [ -e "$target" ] && [ ! -f "$target" ]; }; then
    echo "error: $target became a link or a folder during the check; the new results stay in $STAGE" >&2
    exit 1
  fi
done
stale=()
for f in "$OUT"/pytest.xml "$OUT"/throughput_n*.json; do  # of the earlier set, not in the new one
  [ -f "$f" ] && [ ! -L "$f" ] && [ ! -e "$STAGE/${f##*/}" ] && stale+=("$f")
done
sync "${new[@]}" || { echo "error: cannot sync the results in $STAGE" >&2; exit 1; }
for f in "${new[@]}"; do
  mv -fT "$f" "$OUT/${f##*/}" || { echo "error: cannot move $f into $OUT; the rest stays in $STAGE" >&2; exit 1; }
done
rm -f "${stale[@]}"
rmdir "$STAGE"
sync "$OUT"
echo "gpu_check: results in $OUT (gpu_check.json, gpu_check.log)"
exit $status
