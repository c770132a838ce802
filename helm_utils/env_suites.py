"""The environments beside MiniGrid (docs/environments.md): MiniWorld, Memory Gym and Procgen in memory mode
are registered on first use; every env is checked to give what the agents need (RGB pixels, Discrete or
MultiDiscrete actions); the agents' actions are turned into what the env takes."""

import importlib
import importlib.util
import os

import gymnasium as gym
import numpy as np

from helm_utils import fail

GL_HELP = (
    "MiniWorld renders with OpenGL, headless through EGL: on Debian or Ubuntu, "
    "apt-get install libegl1 libgl1 libglu1-mesa libgl1-mesa-dri libfontconfig1"
)
MEMORY_GYM = ("memory_gym", "pip install --no-deps -r requirements/memory-gym.txt")
# Suites beside MiniGrid, by the start of their env ids: the module that registers their envs (imported only
# when one of them is asked for) and how to install it. docs/environments.md
ENV_SUITES = {
    # the project's own: MiniGrid-Memory with the cue in the first observation (helm_utils/passive_memory.py)
    "HELM-PassiveMemory": ("helm_utils.passive_memory", "it is part of this repository"),
    "MiniWorld-": ("miniworld", f"pip install -r requirements/requirements.txt; {GL_HELP}"),
    "MortarMayhem": MEMORY_GYM,
    "MysteryPath": MEMORY_GYM,
    "SearingSpotlights": MEMORY_GYM,
    "Endless-": MEMORY_GYM,
    # bsuite's memory experiments as pixels, by bsuite's setting ids: bsuite/memory_len/<i>, bsuite/memory_size/<i>
    "bsuite/": ("helm_utils.bsuite_memory", "pip install -r requirements/requirements.txt (bsuite and shimmy)"),
    # procgen needs numpy < 2: a virtualenv of its own; helm_utils/procgen_memory.py adapts it to gymnasium
    "procgen-memory-": (
        "helm_utils.procgen_memory",
        "python3 -m venv .venv-procgen && .venv-procgen/bin/pip install -r requirements/procgen.txt, "
        "then run with .venv-procgen/bin/python",
    ),
}


def import_env_suite(env_id):
    """Register the envs of env_id's suite (docs/environments.md). MiniWorld renders off-screen through
    EGL, so no display (nor xvfb) is needed."""
    suite = next((suite for prefix, suite in ENV_SUITES.items() if env_id.startswith(prefix)), None)
    if suite is None or env_id in gym.registry:
        return
    module, install = suite
    if module == "miniworld":
        os.environ.setdefault("PYGLET_HEADLESS", "true")  # read by pyglet when miniworld first imports it
        # triton, which torch's compiler stack imports later (through torchvision), carries its own LLVM; loaded
        # after Mesa's software renderer (linked to the system's LLVM) has made a GL context, it segfaults.
        # Loaded before any GL context, both work.
        if importlib.util.find_spec("triton") is not None:
            import triton  # noqa: F401
    if module == "memory_gym":
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")  # pygame.init() opens a sound card it never uses
    try:
        importlib.import_module(module)
    except ImportError as e:
        fail(f"{env_id} needs the module {module}, which cannot be imported ({e}); install it with: {install}")


def check_env_id_from_file(env_id, what, command_line=None):
    """An env id read from a file made elsewhere (a checkpoint) may name a registered environment or one of the
    suites above, nothing else: gymnasium imports the module of an id `module:Env-v0` before it looks the env
    up, which runs that module's code. Such an id is honoured only when the command line gives it
    (`command_line`). Ids of another type are left to the checks of the arguments."""
    if not isinstance(env_id, str) or env_id == command_line:
        return
    if ":" in env_id:
        fail(
            f"{what}: env_id {env_id!r} names a module to import, which a file made elsewhere may not; "
            f"give --env-id {env_id} on the command line to run it"
        )
    if env_id not in gym.registry and not any(env_id.startswith(prefix) for prefix in ENV_SUITES):
        fail(f"{what}: env_id {env_id!r} is neither a registered environment nor of a known suite")


def make(env_id, render_mode=None):
    """gym.make(env_id) with its suite registered first, and one line instead of a traceback when it fails."""
    import_env_suite(env_id)
    if env_id.startswith("bsuite/"):  # bsuite's setting ids are not gymnasium ids (two slashes)
        from helm_utils import bsuite_memory

        try:
            import bsuite  # noqa: F401
            import shimmy  # noqa: F401
        except ImportError as e:
            fail(f"{env_id} needs bsuite and shimmy ({e}); install them with: {ENV_SUITES['bsuite/'][1]}")
        return bsuite_memory.make(env_id, render_mode)
    try:
        return gym.make(env_id, render_mode=render_mode)
    except gym.error.Error as e:
        fail(f"unknown or unusable environment {env_id!r} ({e})")
    except ImportError as e:  # a system library of the renderer
        fail(f"{env_id} cannot be made: {e}" + (f"; {GL_HELP}" if env_id.startswith("MiniWorld-") else ""))


def run_label(env_id):
    """The env id as it starts a run directory's name: one folder, so bsuite's setting ids lose their slashes and
    say what the setting is, lest an index be read as a length (bsuite/memory_len/9 -> bsuite-memory_len-9-length10)."""
    if not env_id.startswith("bsuite/"):
        return env_id
    from helm_utils import bsuite_memory

    return f"{env_id.replace('/', '-')}-{bsuite_memory.describe(env_id)}"


def check_spaces(env, env_id):
    """One line unless env observes RGB images (H, W, 3) of uint8 of at least 8x8 pixels and acts with
    Discrete or MultiDiscrete (one dimension) actions: what the agents' CNN and categoricals take."""
    space = env.observation_space
    if not (
        isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] == 3
    ):
        fail(f"{env_id} does not observe RGB images (H, W, 3) of uint8 but {space}; these agents need pixels")
    if min(space.shape[:2]) < 8:
        fail(f"{env_id} observes images of {space.shape[0]}x{space.shape[1]} pixels; the CNN needs at least 8x8")
    if not isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) or (
        isinstance(env.action_space, gym.spaces.MultiDiscrete) and env.action_space.nvec.ndim != 1
    ):
        fail(
            f"{env_id} has the action space {env.action_space}; these agents need Discrete or MultiDiscrete "
            "(one dimension) actions"
        )


def action_dims(space):
    """Choices per action dimension: (n,) for Discrete, nvec for MultiDiscrete (one categorical each)."""
    return (int(space.n),) if isinstance(space, gym.spaces.Discrete) else tuple(int(n) for n in space.nvec)


def env_actions(action, space):
    """The agent's actions (num_envs, n_dims) as the vector env takes them: (num_envs,) for Discrete."""
    action = action.cpu().numpy()
    return action[:, 0] if isinstance(space, gym.spaces.Discrete) else action
