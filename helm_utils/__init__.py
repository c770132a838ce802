"""What the training scripts need but a reader of an algorithm does not: run infrastructure, once.

The three scripts (helm_ppo.py, helmv2_ppo.py, shelm_ppo.py) hold their whole algorithm in one file each,
CleanRL style; they call this package in a few named lines, as CleanRL's scripts call cleanrl_utils/.
docs/layout.md says what lives where and why.

- arguments: the checks every script's arguments get, and --resume's command line
- checkpoints: save, read, validate and restore a run's whole state
- runs: run names and directories, signals, the logs (tensorboard, wandb, videos), the end of a run
- frozen_models: where the Transformer-XL and CLIP come from (hub, local files, tiny random models)
- observation_cache: frozen-encoder outputs of observations seen before
- env_suites: MiniGrid beside MiniWorld, Memory Gym and Procgen; action dimensions
- evaluation, memory_view, hub: playing a saved agent, its memory as text and video, the Hugging Face hub
- files: safe reading and atomic writing
- timing: where a training update's time goes
"""


class InputError(SystemExit):
    """What fail() raises: a SystemExit (Python prints its one line and exits with status 1) that the package
    can tell apart from other exits, e.g. to ask whether --resume would take a state before writing it."""


def fail(message):
    """Stop with one clear line on stderr and exit status 1."""
    raise InputError(f"error: {message}")
