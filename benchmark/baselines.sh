#!/usr/bin/env bash
# The papers' baselines, LSTM-PPO and CNN-PPO (benchmark/baselines/lstm_ppo.py, docs/benchmarks.md), on the papers'
# environments with the original code's published LSTM and PPO configurations (benchmark/configs.json), 5 seeds.
# No frozen models; 500k-2M steps per run, so a GPU helps. Extra arguments go to benchmark/launch.py, e.g.
#   bash benchmark/baselines.sh --dry-run
#   bash benchmark/baselines.sh --scripts lstm_ppo.py --env-ids MiniGrid-MemoryS11-v0 --workers 2
#   bash benchmark/baselines.sh --cluster slurm --slurm-partition gpu
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" benchmark/launch.py --scripts lstm_ppo.py cnn_ppo.py --published --seeds 1 2 3 4 5 \
    --env-ids MiniGrid-DoorKey-5x5-v0 MiniGrid-DoorKey-6x6-v0 MiniGrid-Dynamic-Obstacles-5x5-v0 \
    MiniGrid-KeyCorridorS3R1-v0 MiniGrid-MemoryS11-v0 MiniGrid-RedBlueDoors-6x6-v0 MiniGrid-Unlock-v0 \
    MiniWorld-CollectHealth-v0 MiniWorld-FourRooms-v0 MiniWorld-MazeS3Fast-v0 MiniWorld-PickupObjects-v0 \
    MiniWorld-PutNext-v0 MiniWorld-Sign-v0 MiniWorld-TMaze-v0 MiniWorld-YMaze-v0 \
    "$@"
