"""Watch a trained HELM, HELMv2 or SHELM agent, and read what it remembers.

    python enjoy.py runs/<run_name>/model_best.pt --episodes 5 --show-memory

Loads any checkpoint written by helm_ppo.py, helmv2_ppo.py or shelm_ppo.py, rebuilds the frozen
models it was trained with (same sources and arguments) and runs the policy with the frozen encoder
in evaluation mode (HELMv2's running statistics stay fixed). With --show-memory it prints, for every
step of the first env, the vocabulary tokens that entered the Transformer-XL memory.
"""

import importlib
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

from prepare_embeddings import fail, read_checkpoint


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a checkpoint written by one of the training scripts (model_best.pt, model_final.pt, checkpoint.pt)"""
    episodes: int = 10
    """number of episodes to run (over all envs)"""
    num_envs: int = 1
    """parallel envs (HELMv2 with --rescale batch needs at least 2)"""
    greedy: bool = False
    """take the most likely action instead of sampling"""
    show_memory: bool = False
    """print the tokens entering the memory at each step of env 0"""
    capture_video: bool = False
    """record env 0 to videos/<run_name>-enjoy"""
    seed: int | None = None
    """environment seed (default: the training seed + 10000, so evaluation episodes are new ones)"""
    cuda: bool = True
    """use CUDA when available"""


def main(cli):
    if cli.episodes < 1 or cli.num_envs < 1:
        fail("--episodes and --num-envs must be >= 1")
    if cli.seed is not None and not 0 <= cli.seed < 2**32:
        fail(f"--seed must be in [0, 2**32), got {cli.seed}")
    ckpt = read_checkpoint(cli.checkpoint)  # read once, validated by the script that wrote it
    algorithm = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if algorithm not in ("helm", "helmv2", "shelm"):
        fail(f"{cli.checkpoint} is not a checkpoint of helm_ppo.py, helmv2_ppo.py or shelm_ppo.py")
    algo = importlib.import_module(f"{algorithm}_ppo")
    args = algo.validate_checkpoint(ckpt, cli.checkpoint)
    args.num_envs, args.capture_video, args.cuda = cli.num_envs, cli.capture_video, cli.cuda
    algo.check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)

    envs, _ = algo.make_envs(args, f"{ckpt['run_name']}-enjoy")
    trxl, vocab, encoder = algo.build_memory(args, device, verbose=False, may_write=algo.may_write_output_dirs(args))
    agent = algo.Agent(envs.single_observation_space.shape, envs.single_action_space.n, trxl.d_model).to(device)
    algo.load_trained(agent, encoder, ckpt, cli.checkpoint)
    agent.eval()
    encoder.eval()  # evaluation: HELMv2's running statistics are frozen

    print(f"{algorithm} agent from {cli.checkpoint} (step {ckpt['global_step']}) on {args.env_id}")
    obs_np, _ = envs.reset(seed=args.seed + 10_000 if cli.seed is None else cli.seed)
    mems, memory_mask = algo.init_memory(trxl, args.num_envs, args.memory_reset, device)
    returns, t = [], 0
    with torch.no_grad():
        while len(returns) < cli.episodes:
            trxl_in, tokens = encoder(obs_np)
            trxl_out, mems, memory_mask = trxl(trxl_in, mems, memory_mask)
            obs = torch.from_numpy(obs_np).to(device)
            if cli.greedy:
                action = agent.actor(agent.features(trxl_out[-1], obs)).argmax(dim=-1)
            else:
                action, _, _, _ = agent.get_action_and_value(trxl_out[-1], obs)
            if cli.show_memory:
                print(f"  t={t:3d}  memory <- {' '.join(vocab[i] for i in tokens[0].tolist())}")
            obs_np, _, terminations, truncations, infos = envs.step(action.cpu().numpy())
            done = np.logical_or(terminations, truncations)
            mems, memory_mask = algo.reset_memory(
                mems, memory_mask, torch.as_tensor(done, device=device), args.memory_reset
            )
            t += 1
            if "episode" in infos:
                for i in np.nonzero(infos["_episode"])[0]:
                    returns.append(float(infos["episode"]["r"][i]))
                    print(f"episode {len(returns)}: return {returns[-1]:.3f}, length {int(infos['episode']['l'][i])}")
            if done[0]:
                t = 0
    envs.close()
    print(f"mean return over {len(returns)} episodes: {np.mean(returns):.3f} +- {np.std(returns):.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
    sys.exit(0)
