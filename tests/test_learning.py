"""The learning check in the suite: the whole pipeline (env, frozen encoder, Transformer-XL, PPO) learns to use the
memory where the memory-ablated twin cannot. A file of its own, so that the suite's two workers share the load
(pytest -n 2 --dist loadfile)."""

import importlib
import sys

from conftest import ROOT


def test_helm_learns_to_use_its_memory_where_its_ablated_twin_cannot(tmp_path):
    """benchmark/learning_check.py for HELM, the fastest of the three (no CLIP), with the tiny random models: on
    bsuite's length-3 task (bsuite/memory_len/2: the context bit in the first two frames, the question two steps
    later, only the answer rewarded) the memory agent is right in at least 0.75 of its episodes in the last quarter
    of 6,144 steps, its ablated twin (the same agent reading zeros) in about half. HELMv2 and SHELM differ from HELM
    in the encoder alone (tests/test_drift.py); `python benchmark/learning_check.py` checks all three (30 s on 2
    cores, docs/benchmarks.md)."""
    sys.path.insert(0, str(ROOT / "benchmark"))
    tool = importlib.import_module("learning_check")
    args = tool.Args(scripts=("helm_ppo.py",), workers=2)
    results, passed = tool.check(args, str(tmp_path))
    success = {ablated: value for _, ablated, value, _, _ in results}
    assert passed and success[False] >= 0.75 and 0.35 < success[True] < 0.65, results
    assert all(episodes >= 300 for *_, episodes, _ in results), results  # 6,144 steps of 4 decisions each
