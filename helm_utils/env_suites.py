"""The environments beside MiniGrid (docs/environments.md): MiniWorld, Memory Gym and Procgen in memory mode
are registered on first use; every env is checked to give what the agents need (RGB pixels, Discrete or
MultiDiscrete actions); the agents' actions are turned into what the env takes."""

import atexit
import contextlib
import functools
import importlib
import importlib.util
import multiprocessing.connection
import os
import signal

import gymnasium as gym
import numpy as np
from gymnasium.vector import async_vector_env

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


# ---------------------------------------------------------------------------------------------
# --async-envs: gymnasium's AsyncVectorEnv, keeping the scripts' promises on signals and errors
# ---------------------------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
WORKER_FAILURE_WAIT = 5  # seconds to wait for a failed worker's report or its exit


def env_worker(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore):
    """gymnasium's worker, deaf to SIGINT and SIGTERM: Ctrl-C reaches the whole process group and a cluster's
    SIGTERM every process, but only the main process may act on them (it saves its checkpoint, then stops the
    workers; docs/reliability.md). The signals are blocked from before the fork (AsyncVectorEnv below) until
    they are ignored here, so no signal finds the main process's handlers in a worker. What fails before
    gymnasium's own error handling (making the env) is reported the same way; a main process that is gone
    (its pipe closed) ends the worker without a word."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        async_vector_env._async_worker(
            index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, semaphore
        )
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the main process is gone: nobody to report to
        pass
    except BaseException as e:  # noqa: BLE001 - making the env failed (a one-line error included): report it
        with contextlib.suppress(Exception):
            error_queue.put((index, type(e).__name__, str(e.code if isinstance(e, SystemExit) else e), ""))
            pipe.send((None, False))


class AsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv (--async-envs) under the promises of docs/reliability.md. Its workers ignore
    SIGINT and SIGTERM (env_worker), so that a signal to every process ends the run as without workers: the
    main process finishes its step, saves and exits, and its exit stops the workers (stop_workers). A worker
    that dies (SIGKILL, a crash) or raises stops the run with one line naming it; nothing is saved after it,
    so the run's last checkpoint stays its last good state. `checkpoint_note` (set by helm_utils.runs) says
    in that line where the last checkpoint is."""

    def __init__(self, env_fns, **kwargs):
        self.processes, self.checkpoint_note = [], None  # checkpoint_note: a function, set by helm_utils.runs
        # registered first: a signal (or an error) while the workers start still stops the ones started. atexit
        # runs it before multiprocessing's own exit handler, whose SIGTERM the workers ignore
        atexit.register(self.stop_workers)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until the workers ignore them
        try:
            super().__init__(env_fns, worker=env_worker, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is handled now

    def stop_workers(self):
        """Kill the workers (they ignore SIGTERM) and wait for them: at the exit of the main process, after a
        signal or an error. Their envs are not closed, as the envs of a run without workers are not on a signal."""
        atexit.unregister(self.stop_workers)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            if process.pid is not None:  # started
                process.join()
        self.closed = True  # nothing left to close (gymnasium's __del__ would wait on the dead workers)

    def worker_failed(self, index, what):
        """Stop the workers and the run, with one line naming worker `index` and what happened to it."""
        pid = self.processes[index].pid
        self.stop_workers()
        note = self.checkpoint_note() if self.checkpoint_note else "nothing was saved after it"
        fail(f"env worker {index} of {self.num_envs} (pid {pid}) {what}; the run stops here ({note})")

    def dead_worker(self, error):
        """A pipe to a worker broke (`error`): the worker that ended, named with its own report of what failed if it
        made one (an env that could not be made), else with how it ended (a signal, an exit status)."""
        sentinels = {process.sentinel: i for i, process in enumerate(self.processes)}
        ready = multiprocessing.connection.wait(list(sentinels), timeout=WORKER_FAILURE_WAIT)
        if not ready:  # not a worker's end: the pipe itself failed
            self.stop_workers()
            fail(f"the pipe to an env worker failed ({type(error).__name__}: {error})")
        report = self.error_report(timeout=0.5)
        if report is not None:
            self.worker_failed(*report)
        index = sentinels[ready[0]]
        self.processes[index].join()
        code = self.processes[index].exitcode
        signals = {-s.value: s.name for s in signal.Signals}
        self.worker_failed(index, f"was killed by {signals[code]}" if code in signals else f"exited with status {code}")

    def error_report(self, timeout=WORKER_FAILURE_WAIT):
        """(worker index, "failed: <exception>") of the next error a worker reported, or None: none came in time,
        or one that cannot be read here (unpickled)."""
        try:
            index, kind, value, _ = self.error_queue.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - none in time (queue.Empty), or a report that cannot be unpickled here
            return None
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        message = " ".join(str(value).split()).removeprefix("error: ")[:300]
        return (index if index in range(self.num_envs) else 0), f"failed: {name}: {message}"

    def _raise_if_errors(self, successes):
        """A worker that raised (it reported the error and ended): one line naming it, not gymnasium's log of
        the worker's traceback and the exception re-raised in this process."""
        if all(successes):
            return
        index = list(successes).index(False)
        self.worker_failed(*(self.error_report() or (index, "failed (its report of the error could not be read)")))

    def close_extras(self, timeout=None, terminate=False):
        """The workers closed (they close their envs, which writes a video under way) and ended; a worker that died
        meanwhile only ends the closing (the run's steps are all done)."""
        atexit.unregister(self.stop_workers)
        if terminate:
            self.stop_workers()
            return
        try:
            super().close_extras(timeout, terminate)
        except (EOFError, OSError):
            self.stop_workers()


def _worker_failures(method):
    """A broken pipe to a worker, in a call of `method`, is one line naming the worker (dead_worker)."""

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (EOFError, OSError) as e:
            self.dead_worker(e)

    return checked


_CALLS = [
    "_check_spaces",
    "reset_async",
    "reset_wait",
    "step_async",
    "step_wait",
    "call_async",
    "call_wait",
    "set_attr",
]
for _name in _CALLS:
    setattr(AsyncVectorEnv, _name, _worker_failures(getattr(gym.vector.AsyncVectorEnv, _name)))
