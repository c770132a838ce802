#!/usr/bin/env bash
# What a 2-core CPU can run: the tiny random models, all three algorithms, 3 seeds, 2 runs at a time.
# MiniGrid-DoorKey-5x5-v0 with the published configurations, 20,480 steps per run; MiniGrid-MemoryS7-v0
# (solvable only by remembering the object shown at the start) with the scripts' defaults (the published
# MiniGrid-Memory configurations) and a memory window of 256 steps (its episodes last at most 245), 12,288 steps
# per run, beside the same agent with its memory output zeroed (--ablate-memory). 27 runs: about 75 min on 2
# cores shared with other work (nice 10), about 30 min on 2 idle cores. Plot: see docs/benchmarks.md.
# Extra arguments go to benchmark/launch.py (both grids), e.g. bash benchmark/tiny_cpu.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
common=(--tiny --scripts shelm_ppo.py helm_ppo.py helmv2_ppo.py --seeds 1 2 3 --workers 2 --threads-per-run 1
    --n-layer 2)
"$PYTHON" benchmark/launch.py "${common[@]}" --env-ids MiniGrid-DoorKey-5x5-v0 --published \
    --total-timesteps 20480 "$@"
"$PYTHON" benchmark/launch.py "${common[@]}" --env-ids MiniGrid-MemoryS7-v0 --total-timesteps 12288 \
    --variants "memory:--mem-len 256" "ablated:--mem-len 256 --ablate-memory" "$@"
