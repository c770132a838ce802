#!/usr/bin/env bash
# The wheels the GPU machine lacks, downloaded into .whl/ (not committed) for benchmark/gpu_check.sh, which
# installs them there without a network. Run it here, where PyPI is reachable:
#
#     bash benchmark/gpu_wheels.sh            # .whl/: cp312 manylinux x86-64 wheels, and pure-python ones
#
# The GPU machine (issue 19) has its own Python 3.12 with torch 2.11, torchvision 0.26, tensorboard, timm,
# huggingface_hub, scikit-learn, matplotlib, numpy, pandas, scipy, safetensors, tqdm, pytest, pillow,
# imageio, regex, cloudpickle, typing-extensions, rich and PyYAML (GPU_HAS below). What it lacks and the
# check needs: the three training scripts on MiniGrid (gymnasium, minigrid, and pygame-ce, which minigrid
# imports at import time), tyro, open_clip_torch, submitit, and their own dependencies. Every wheel is
# downloaded with --no-deps and named here; the script then reads each wheel's Requires-Dist and fails if
# one is neither here nor in GPU_HAS, so nothing is left for a resolver to find there.
#
# Left out, and why (sizes of the cp312 x86-64 wheels at the pins of requirements/):
#   imageio-ffmpeg 0.8.1: 64.85 MiB (an ffmpeg binary), more than all that can be carried (64 MiB with the
#     working tree); without it moviepy cannot write a video, so moviepy (0.12 MiB, with decorator, proglog,
#     python-dotenv) is left out too, and gpu_check.sh skips the video tests, saying so.
#   rliable 1.2.0 (only an sdist on PyPI, pure Python), for benchmark/plot.py, which the check never runs: with
#     arch 0.93 MiB, statsmodels 11.48 MiB, seaborn, patsy, formulaic, interface-meta, narwhals and wrapt it
#     would add 13.8 MiB; and arch 7.2 breaks on pandas 3 (requirements/benchmark.txt), whatever pandas is there.
#   wandb, miniworld: not wanted on that machine (no network; MiniWorld needs system GL libraries).
#
# The total must stay under WHEEL_BUDGET_MIB (40), and with the working tree (what git would send: tracked
# files and untracked ones it does not ignore) under CARRY_BUDGET_MIB (64): the most that travels there.
#
# The wheels are downloaded into a fresh folder beside .whl/ (WHEEL_DIR), checked (dependencies, budgets), and
# only then take its place: a download that fails or wheels that do not fit leave the earlier .whl/ as it was.
# Before anything is downloaded: the budgets are whole numbers, WHEEL_DIR is no link, holds nothing but wheels
# (it is replaced whole) and lies in a folder that can be written, PYTHON has pip and packaging, every pin is
# found; one `error:` line otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
DEST="${DEST%/}"
cd "$ROOT"
WHEEL_BUDGET_MIB="${WHEEL_BUDGET_MIB:-40}"
CARRY_BUDGET_MIB="${CARRY_BUDGET_MIB:-64}"
if [ -n "${PYTHON:-}" ]; then :; elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi

fail() {
  echo "error: $*" >&2
  exit 1
}
for budget in WHEEL_BUDGET_MIB CARRY_BUDGET_MIB; do
  [[ "${!budget}" =~ ^[1-9][0-9]{0,5}$ ]] || fail "$budget must be a whole number of MiB in [1, 999999], got '${!budget}'"
done
PARENT="$(dirname "$DEST")"
[ -L "$DEST" ] && fail "WHEEL_DIR $DEST is a link; give the folder it points to"
if [ -e "$DEST" ]; then
  [ -d "$DEST" ] || fail "WHEEL_DIR $DEST is not a folder"
  other="$(find "$DEST" -mindepth 1 \( ! -type f -o ! -name '*.whl' \) -print -quit)"
  [ -z "$other" ] || fail "WHEEL_DIR $DEST holds $other, not a wheel: the folder is replaced whole by the new wheels; move it away"
fi
[ -d "$PARENT" ] || fail "WHEEL_DIR $DEST: its folder $PARENT does not exist or is not a folder"
"$PYTHON" -c 'import packaging.requirements' 2>/dev/null && "$PYTHON" -m pip --version >/dev/null 2>&1 ||
  fail "$PYTHON cannot run pip and import packaging, which download and check the wheels"

# the pin of a package in requirements/*.txt (the versions the project is tested with)
pin() {
  local line
  line="$(grep -hi "^$1==" requirements/*.txt | head -1)"
  [ -n "$line" ] || { echo "error: no pin of $1 in requirements/*.txt" >&2; exit 1; }
  echo "$line"
}

# what the GPU machine lacks, with the pins of requirements/ where there are some; the others (dependencies
# the requirements do not name) at the versions of this project's tested virtualenv
WHEELS=(
  "$(pin gymnasium)"            # the scripts' envs
  farama-notifications==0.0.6   #   gymnasium's
  "$(pin minigrid)"             # the scripts import it
  "$(pin pygame-ce)"            #   minigrid's, imported by minigrid at import time (minigrid_env.py)
  "$(pin tyro)"                 # the scripts' command lines
  docstring-parser==0.18.0      #   tyro's
  typeguard==4.6.1              #   tyro's (needs typing-extensions >= 4.14)
  "$(pin open_clip_torch)"      # SHELM's and HELMv2's CLIP (the tiny and random models too)
  ftfy==6.3.1                   #   open_clip's
  wcwidth==0.9.4                #   ftfy's
  "$(pin submitit)"             # benchmark/launch.py
)
# on the GPU machine already (issue 19), with what those pull in themselves; a Requires-Dist of a wheel
# above must name one of these or one of the wheels
GPU_HAS="torch torchvision tensorboard timm huggingface-hub scikit-learn matplotlib numpy pandas scipy
safetensors tqdm pytest pillow imageio regex cloudpickle typing-extensions rich pyyaml"

# the working tree as git would send it, counted before the new wheels' folder exists beside .whl/
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')

# a fresh folder (no fixed name: two downloads at once do not meet), removed unless it becomes the new .whl/
NEW="$(mktemp -d "$PARENT/.whl-new.XXXXXX")" || fail "cannot make a folder in $PARENT"
trap 'rm -rf "$NEW"' EXIT
echo "downloading ${#WHEELS[@]} wheels into $NEW ($PYTHON -m pip), then into $DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$NEW" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "${WHEELS[@]}" 2> >(grep -v "^WARNING: Location 'file:" >&2)  # this machine's local indexes: noise

# every dependency named: each wheel's Requires-Dist (markers for CPython 3.12 on Linux x86-64, no extras)
# is one of the wheels or on the GPU machine
"$PYTHON" - "$NEW" "$GPU_HAS" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

dest, gpu_has = Path(sys.argv[1]), sys.argv[2].split()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = {}
for whl in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    wheels[name] = [r for r in reqs if r.marker is None or r.marker.evaluate(env)]
known = set(wheels) | {norm(n) for n in gpu_has}
missing = [(name, str(r)) for name, reqs in wheels.items() for r in reqs if norm(r.name) not in known]
for name, reqs in wheels.items():
    print(f"  {name}: requires {', '.join(str(r) for r in reqs) or 'nothing'}")
if missing:
    sys.exit("error: dependencies neither downloaded nor on the GPU machine: " + "; ".join(f"{n} needs {r}" for n, r in missing))
EOF

# sizes: the wheels, and the working tree as git would send it
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }
wheel_bytes=0
while IFS= read -r -d '' f; do
  size=$(stat -c %s "$f")
  wheel_bytes=$((wheel_bytes + size))
  printf '  %8.2f MiB  %s\n' "$(mib "$size")" "$(basename "$f")"
done < <(find "$NEW" -maxdepth 1 -type f -name '*.whl' -print0 | sort -z)
echo "wheels: $(mib "$wheel_bytes") MiB in $(find "$NEW" -maxdepth 1 -type f -name '*.whl' | wc -l) files (budget $WHEEL_BUDGET_MIB MiB)"
echo "working tree (tracked + untracked not ignored): $(mib "$tree_bytes") MiB"
echo "together: $(mib $((wheel_bytes + tree_bytes))) MiB (budget $CARRY_BUDGET_MIB MiB)"
if [ "$wheel_bytes" -gt $((WHEEL_BUDGET_MIB * 1048576)) ]; then
  echo "error: the wheels take more than $WHEEL_BUDGET_MIB MiB" >&2
  exit 1
fi
if [ $((wheel_bytes + tree_bytes)) -gt $((CARRY_BUDGET_MIB * 1048576)) ]; then
  echo "error: the wheels and the working tree take more than $CARRY_BUDGET_MIB MiB" >&2
  exit 1
fi

# checked: the new folder takes the place of the earlier one (two renames; the earlier wheels are deleted last)
chmod "$(printf '%o' $((0777 & ~0$(umask))))" "$NEW"  # mktemp made it private
sync "$NEW"/*.whl
OLD=""
if [ -e "$DEST" ]; then
  OLD="$(mktemp -d "$PARENT/.whl-old.XXXXXX")"
  mv -T "$DEST" "$OLD/whl"
fi
mv -T "$NEW" "$DEST"
[ -z "$OLD" ] || rm -rf "$OLD"
echo "wheels in $DEST"
