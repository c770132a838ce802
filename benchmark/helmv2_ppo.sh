#!/usr/bin/env bash
# HELMv2 on the papers' environments with the original code's published configurations (benchmark/configs.json),
# 5 seeds, the real pretrained models: a GPU study. Extra arguments go to benchmark/launch.py, e.g.
#   bash benchmark/helmv2_ppo.sh --dry-run
#   bash benchmark/helmv2_ppo.sh --cluster slurm --slurm-partition gpu
#   bash benchmark/helmv2_ppo.sh --env-ids MiniGrid-MemoryS11-v0 --variants memory: ablated:--ablate-memory
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
"$PYTHON" benchmark/launch.py --scripts helmv2_ppo.py --published --seeds 1 2 3 4 5 \
    --env-ids MiniGrid-DoorKey-5x5-v0 MiniGrid-DoorKey-6x6-v0 MiniGrid-Dynamic-Obstacles-5x5-v0 \
    MiniGrid-KeyCorridorS3R1-v0 MiniGrid-MemoryS11-v0 MiniGrid-RedBlueDoors-6x6-v0 MiniGrid-Unlock-v0 \
    MiniWorld-CollectHealth-v0 MiniWorld-FourRooms-v0 MiniWorld-MazeS3Fast-v0 MiniWorld-PickupObjects-v0 \
    MiniWorld-PutNext-v0 MiniWorld-Sign-v0 MiniWorld-TMaze-v0 MiniWorld-YMaze-v0 \
    "$@"
