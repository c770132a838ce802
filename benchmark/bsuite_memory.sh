#!/usr/bin/env bash
# bsuite's memory experiments (docs/benchmarks.md, "Memory length and size"): every agent on bsuite's memory_len
# (one bit, asked after a growing length L) and memory_size (a growing number of bits, asked at length 2), the
# memory agents beside their ablated twins (--ablate-memory) and the baselines LSTM-PPO and CNN-PPO, then bsuite's
# CSVs, scores and the success figure (benchmark/bsuite_memory.py). Settings are bsuite's ids: memory_len/9 is
# length 10, memory_size/2 three bits (docs/environments.md). Each run lasts a number of episodes, as bsuite counts
# its experiments (launch.py --bsuite-episodes). Every agent has the same PPO settings: the scripts' defaults (the
# published MiniGrid-Memory configuration) but for --num-steps 32, --learning-rate 5e-4 (the published rates differ
# per agent, tuned for MiniGrid: HELM 1e-4, HELMv2 3e-4, SHELM 5e-4, LSTM-PPO 5e-5) and --anneal-lr (the rate falls
# linearly to 0, as in CleanRL's PPO: without it policies that had solved a setting fell back to chance late in
# some runs, just where success is measured). docs/benchmarks.md, "Memory length and size".
#
#   bash benchmark/bsuite_memory.sh             CPU preset (245 runs, 2 cores, about 1.5 hours): the tiny random
#                                               models with 2 layers, lengths 1 3 5 10 20 30 (30 is beyond the Transformer-XL's
#                                               reach, 2 x 14 steps) and 30 with --mem-len 16 (within it), bits 1 2 3
#                                               5, 3 seeds (5 at lengths 3 and 10), EPISODES (3000)
#                                               episodes per run; and HELM at real size (random-wt103
#                                               weights, 2 layers) at lengths 3 and 10
#   bash benchmark/bsuite_memory.sh --full      for a cluster: bsuite's whole sweep (23 lengths up to 100, 17 sizes
#                                               up to 40 bits), 10,000 episodes per run as bsuite, the real
#                                               pretrained models with 2 layers, 3 seeds
#
# Extra arguments go to benchmark/launch.py, e.g. --dry-run, or --cluster slurm --slurm-partition gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's Python: $PYTHON if set, else the repository's .venv (README's install), else python3
if [ -z "${PYTHON:-}" ]; then if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi; fi
full=false
dry_run=false
args=()
for arg in "$@"; do
    case "$arg" in
        --full) full=true ;;
        --dry-run) dry_run=true; args+=("$arg") ;;
        *) args+=("$arg") ;;
    esac
done
set -- "${args[@]+"${args[@]}"}"
study=studies/bsuite_memory
memory_scripts=(--scripts helm_ppo.py helmv2_ppo.py shelm_ppo.py --variants "memory:" "ablated:--ablate-memory")
baselines=(--scripts lstm_ppo.py cnn_ppo.py)
if [ "$full" = true ]; then
    study=studies/bsuite_memory_full
    ids=()
    for i in $(seq 0 22); do ids+=("bsuite/memory_len/$i"); done
    for i in $(seq 0 16); do ids+=("bsuite/memory_size/$i"); done
    common=(--workdir "$study" --seeds 1 2 3 --bsuite-episodes 10000 --num-steps 32 --learning-rate 5e-4
        --anneal-lr --env-ids "${ids[@]}")
    "$PYTHON" benchmark/launch.py "${common[@]}" --n-layer 2 "${memory_scripts[@]}" "$@"
    "$PYTHON" benchmark/launch.py "${common[@]}" --d-model 1024 "${baselines[@]}" "$@"
else
    episodes=${EPISODES:-3000}
    common=(--workdir "$study" --workers 2 --threads-per-run 1 --bsuite-episodes "$episodes" --num-steps 32
        --learning-rate 5e-4 --anneal-lr)
    # first the settings of the question, with 5 seeds: does each memory beat its ablation at lengths 3 and 10?
    key=(--seeds 1 2 3 4 5 --env-ids bsuite/memory_len/2 bsuite/memory_len/9)
    "$PYTHON" benchmark/launch.py "${common[@]}" "${key[@]}" --tiny --n-layer 2 "${memory_scripts[@]}" "$@"
    "$PYTHON" benchmark/launch.py "${common[@]}" "${key[@]}" --tiny "${baselines[@]}" "$@"
    # then the rest of the curves with 3. The three ablated twins are one program (the same agent reading zeros,
    # drawn from the same seed: their episodes are identical, as the settings above show), so one of them stands for
    # the three here
    rest=(--seeds 1 2 3 --env-ids bsuite/memory_size/0 bsuite/memory_size/1 bsuite/memory_size/2 bsuite/memory_size/4
        bsuite/memory_len/0 bsuite/memory_len/4 bsuite/memory_len/13 bsuite/memory_len/15)
    "$PYTHON" benchmark/launch.py "${common[@]}" "${rest[@]}" --tiny --n-layer 2 \
        --scripts helm_ppo.py helmv2_ppo.py shelm_ppo.py --variants "memory:" "$@"
    "$PYTHON" benchmark/launch.py "${common[@]}" "${rest[@]}" --tiny --n-layer 2 \
        --scripts helm_ppo.py --variants "ablated:--ablate-memory" "$@"
    "$PYTHON" benchmark/launch.py "${common[@]}" "${rest[@]}" --tiny "${baselines[@]}" "$@"
    common+=(--seeds 1 2 3)
    # the reach moved: with --mem-len 16, two layers read 2 x 15 = 30 steps back, enough for length 30
    "$PYTHON" benchmark/launch.py "${common[@]}" --env-ids bsuite/memory_len/15 --tiny --n-layer 2 --mem-len 16 \
        --scripts helm_ppo.py helmv2_ppo.py shelm_ppo.py --variants "mem16:" "$@"
    # HELM at real size (random weights of transfo-xl-wt103's shape; a user's first run is at that size)
    "$PYTHON" benchmark/launch.py "${common[@]}" --env-ids bsuite/memory_len/2 bsuite/memory_len/9 --n-layer 2 \
        --trxl-model random-wt103 --scripts helm_ppo.py --variants "wt103:" "wt103_ablated:--ablate-memory" "$@"
fi
if [ "$dry_run" = false ]; then
    "$PYTHON" benchmark/bsuite_memory.py --runs "$study/runs" --out "$study/results"
fi
