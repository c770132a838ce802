#!/usr/bin/env bash
# What a 2-core CPU can run: the tiny random models (random weights of the real architecture, scaled down), 3 seeds,
# 2 runs at a time, one thread each. Two studies, each in its own folder under studies/ (its runs/ and plots/):
#   studies/doorkey: the three scripts on MiniGrid-DoorKey-5x5-v0 with the published configurations, 20,480 steps.
#   studies/passive_memory_s7: does the memory remember? HELMv2 (--n-layer 2) on HELM-PassiveMemoryS7-v0
#     (MiniGrid-MemoryS7 with the cue in the first observation: helm_utils/passive_memory.py) with the scripts'
#     defaults (the published MiniGrid-Memory configuration) but for --num-steps 32 (4x the updates per step),
#     beside the same agent with its memory output zeroed (--ablate-memory: the control) and the papers'
#     baselines LSTM-PPO and CNN-PPO with the same PPO settings; 153,600 steps per run (300 updates).
# 21 runs, about 1 h 45 min on 2 idle cores, measured when each LSTM run took about 45 min (its update re-ran the
# LSTM step by step; it now runs it in one call, at about 0.8x CNN-PPO's speed: docs/benchmarks.md, so less now);
# each HELMv2 run 7 min. Results and what they show: docs/benchmarks.md.
# Extra arguments go to benchmark/launch.py (every grid), e.g. bash benchmark/tiny_cpu.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
common=(--seeds 1 2 3 --workers 2 --threads-per-run 1)
dry_run=false
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=true; done

"$PYTHON" benchmark/launch.py "${common[@]}" --workdir studies/doorkey --tiny --n-layer 2 \
    --scripts shelm_ppo.py helm_ppo.py helmv2_ppo.py --env-ids MiniGrid-DoorKey-5x5-v0 --published \
    --total-timesteps 20480 "$@"

memory_study=(--workdir studies/passive_memory_s7 --env-ids HELM-PassiveMemoryS7-v0 --total-timesteps 153600
    --num-steps 32)
"$PYTHON" benchmark/launch.py "${common[@]}" "${memory_study[@]}" --tiny --n-layer 2 --scripts helmv2_ppo.py \
    --variants "memory:" "ablated:--ablate-memory" "$@"
"$PYTHON" benchmark/launch.py "${common[@]}" "${memory_study[@]}" --scripts lstm_ppo.py cnn_ppo.py "$@"

if [ "$dry_run" = false ]; then
    for study in doorkey passive_memory_s7; do
        "$PYTHON" benchmark/plot.py --runs "studies/$study/runs" --out "studies/$study/plots"
    done
fi
