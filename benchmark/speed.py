"""Speed and size of the frozen memory, as ratios to a baseline measured in the same run.

    python benchmark/speed.py            # all measurements, CPU (or --cuda)
    python benchmark/speed.py --only trxl

- trxl: the transfo-xl-wt103 architecture (random weights of the real sizes: the cost does not
  depend on the values) stepping 16 envs with a memory of 15 steps, 18 layers against 2 (--n-layer),
  and the frozen parameter count of each.
- cache: SHELM's observation cache (tokens) on MiniGrid-MemoryS11-v0 with the ViT-B-16 architecture
  (random weights), random actions: encoder time per env step with the cache off against on, and
  the hit rate.

The machines these run on are shared and noisy, so each comparison interleaves its two variants and
reports the ratio of medians. Results go to stdout and docs/results/speed.json (--out), written atomically
(helm_utils.files). Before anything is built: the counts bounded, the sizes against this machine's memory (the
scripts' own check), --out writable and, where --only keeps another section of it, of speed.json's structure.
"""

import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helm_utils import fail  # noqa: E402
from helm_utils.files import output_file, read_json, write_atomically  # noqa: E402

MAX_REPEATS = 100_000  # --repeats, --cache-steps: timed steps, each kept
ENVS, MEM_LEN = 16, 15  # what both measurements step: the scripts' defaults


@dataclass
class Args:
    only: Literal["trxl", "cache"] | None = None
    """trxl or cache (default: both)"""
    cuda: bool = False
    """measure on the GPU"""
    repeats: int = 30
    """timed steps per variant (trxl)"""
    cache_steps: int = 24
    """env steps per variant (cache)"""
    out: str = str(ROOT / "docs" / "results" / "speed.json")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_trxl(args, device):
    import shelm_ppo as S
    from helm_utils import frozen_models

    models = {}
    for n in (18, 2):
        torch.manual_seed(0)
        models[n] = S.TransformerXL(frozen_models.WT103_CONFIG, n, MEM_LEN).to(device).eval().requires_grad_(False)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    times = {18: [], 2: []}
    mems = {n: S.init_memory(m, ENVS, "mask", device) for n, m in models.items()}
    ids = torch.randint(0, frozen_models.WT103_CONFIG["vocab_size"], (1, ENVS), device=device)
    print(f"trxl: {args.repeats} timed steps of 18 and 2 layers, {ENVS} envs", flush=True)
    with torch.no_grad():
        for i in range(args.repeats + 3):
            for n, m in models.items():  # interleaved, so both see the same machine load
                sync(device)
                t = time.perf_counter()
                out, mems_n, mask_n = m(m.word_emb(ids), *mems[n])
                sync(device)
                mems[n] = (mems_n, mask_n)
                if i >= 3:  # warm-up
                    times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "frozen_params_18": params[18],
        "frozen_params_2": params[2],
        "param_reduction_2_vs_18": 1 - params[2] / params[18],
        "step_ms_18": 1000 * med[18],
        "step_ms_2": 1000 * med[2],
        "speedup_2_vs_18": med[18] / med[2],
    }


def bench_cache(args, device):
    import open_clip

    import shelm_ppo as S

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16").to(device).eval().requires_grad_(False)
    text = torch.nn.functional.normalize(torch.randn(20000, 512, device=device), dim=-1)
    ids = torch.arange(20000, device=device)
    word_emb = torch.nn.Embedding(20000, 1024).to(device)
    enc = {c: S.TokenRetrieval(clip, text, ids, word_emb, 1, c) for c in (0, 100_000)}
    env_args = S.Args(env_id="MiniGrid-MemoryS11-v0", num_envs=ENVS)
    envs, _ = S.make_envs(env_args, "bench")
    print(f"cache: {args.cache_steps} env steps of {ENVS} envs, the cache off and on", flush=True)
    obs, _ = envs.reset(seed=0)
    times = {0: [], 100_000: []}
    same = True
    for _ in range(args.cache_steps):
        out = {}
        for c, e in enc.items():
            sync(device)
            t = time.perf_counter()
            out[c] = e(obs)[1]
            sync(device)
            times[c].append(time.perf_counter() - t)
        same &= bool(torch.equal(out[0], out[100_000]))
        obs, *_ = envs.step(envs.action_space.sample())
    hit_rate = enc[100_000].cache.hits / enc[100_000].cache.lookups
    total = {c: sum(v) for c, v in times.items()}
    return {
        "env_steps": args.cache_steps,
        "envs": ENVS,
        "hit_rate": hit_rate,
        "tokens_identical": same,
        "encoder_s_per_step_off": total[0] / args.cache_steps,
        "encoder_s_per_step_on": total[100_000] / args.cache_steps,
        "speedup_cache_on_vs_off": total[0] / total[100_000],
    }


def results_schema():
    """The structure of speed.json (what --only keeps of it is checked before it is written back)."""
    from typing import Annotated, NotRequired

    from pydantic import Field
    from typing_extensions import TypedDict

    number = Annotated[float, Field(allow_inf_nan=False)]

    class Results(TypedDict):
        device: Annotated[str, Field(max_length=1000)]
        torch_threads: Annotated[int, Field(ge=1)]
        trxl: NotRequired[dict[str, number]]
        cache: NotRequired[dict[str, number | bool]]

    return Results


def check_args(args):
    """Before anything is built: the counts, the sizes (the scripts' own check of 18 layers of transfo-xl-wt103 with
    a memory of MEM_LEN for ENVS envs), --out; returns (the path, what of it --only keeps)."""
    import shelm_ppo as S

    for name in ("repeats", "cache_steps"):
        if not 1 <= getattr(args, name) <= MAX_REPEATS:
            fail(f"--{name.replace('_', '-')} must be in [1, {MAX_REPEATS}], got {getattr(args, name)}")
    S.check_args(S.Args(trxl_model="random-wt103", n_layer=18, mem_len=MEM_LEN, num_envs=ENVS, cuda=args.cuda))
    out = output_file(args.out, "--out")
    # --only replaces its own section and keeps the others' last results
    previous = read_json(out, results_schema(), "--out")[0] if out.exists() and args.only else {}
    return out, previous


def main(args):
    out, previous = check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    if args.only in (None, "trxl"):
        results["trxl"] = bench_trxl(args, device)
        print(json.dumps(results["trxl"], indent=1), flush=True)
    if args.only in (None, "cache"):
        results["cache"] = bench_cache(args, device)
        print(json.dumps(results["cache"], indent=1), flush=True)
    data = (json.dumps(previous | results, indent=1, allow_nan=False) + "\n").encode()
    write_atomically(out, lambda f: f.write(data))


if __name__ == "__main__":
    main(tyro.cli(Args))
