#!/usr/bin/env bash
# The layer-pruning study of the SHELM paper: SHELM on MiniGrid-MemoryS11-v0 (published configuration, 2M steps)
# keeping the first 1, 2, 3, 5, 10, 15 or all 18 Transformer-XL layers, 5 seeds; a GPU study.
# Published (one GPU): about 0.95 final return with 18 layers, 0.97 with 2, 1 layer stalls near 0.5;
# about 1.17 h (18 layers) vs 0.98 h (2 layers). Plot: .venv/bin/python benchmark/plot.py (writes pruning.png)
# Extra arguments go to benchmark/launch.py, e.g. bash benchmark/shelm_pruning.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
"$PYTHON" benchmark/launch.py --scripts shelm_ppo.py --published --seeds 1 2 3 4 5 \
    --env-ids MiniGrid-MemoryS11-v0 \
    --variants "layers1:--n-layer 1" "layers2:--n-layer 2" "layers3:--n-layer 3" "layers5:--n-layer 5" \
    "layers10:--n-layer 10" "layers15:--n-layer 15" "layers18:--n-layer 18" \
    "$@"
