#!/usr/bin/env bash
# HELM on the papers' MiniGrid environments with the original code's published configurations
# (benchmark/configs.json; HELM's beta: see the mapping there), 5 seeds, the real pretrained models: a GPU study.
# HELM's other suite, Procgen, does not install here; its MiniWorld configurations are in configs.json too
# (add --env-ids MiniWorld-...). Extra arguments go to benchmark/launch.py, e.g.
#   bash benchmark/helm_ppo.sh --dry-run
#   bash benchmark/helm_ppo.sh --cluster slurm --slurm-partition gpu
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
"$PYTHON" benchmark/launch.py --scripts helm_ppo.py --published --seeds 1 2 3 4 5 \
    --env-ids MiniGrid-DoorKey-5x5-v0 MiniGrid-DoorKey-6x6-v0 MiniGrid-Dynamic-Obstacles-5x5-v0 \
    MiniGrid-KeyCorridorS3R1-v0 MiniGrid-MemoryS11-v0 MiniGrid-RedBlueDoors-6x6-v0 MiniGrid-Unlock-v0 \
    "$@"
