"""A training run: its command line (new or resumed), its name and directory under runs/, the signals that
stop it, its logs (tensorboard, wandb with --track, videos) and its checkpoints, and the end of the run
(evaluation and upload with --upload-model). docs/reliability.md says what each promises.

`script` below is a training script's module: the package reads its ALGORITHM, OUTPUT_DIRS, Args and
check_args, and for the evaluation at the end its make_env, build_memory, Agent and memory functions."""

import collections
import fcntl
import itertools
import math
import os
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import tyro

from helm_utils import checkpoints, env_suites, fail
from helm_utils.arguments import new_run_name, resume_args

RUNS = Path("runs")  # every run directory lies under it, relative to the working directory


def parse(script):
    """(args, checkpoint or None): the command line, or with --resume the checkpoint's arguments with the
    flags given again; checked, the batch sizes filled in. A signal from here until the run directory is
    claimed ends the process at once (nothing is written yet)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, exit_before_training)
    args = tyro.cli(script.Args)
    ckpt = None
    if args.resume:
        # the env id of the command line (or the default) is the only one that may name a module to import
        ckpt = checkpoints.load(args.resume, script, env_id=args.env_id)
        args = resume_args(script.Args, ckpt, args.resume, script.OUTPUT_DIRS)
    script.check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    # the default step count (the papers') is not a multiple of the default batch: docs/reliability.md says so
    if args.total_timesteps % args.batch_size and args.total_timesteps != script.Args.total_timesteps:
        print(
            f"--total-timesteps {args.total_timesteps} is not a multiple of the batch size {args.batch_size}: "
            f"{args.num_iterations} updates, {args.num_iterations * args.batch_size} steps"
        )
    return args, ckpt


def exit_before_training(signum, frame):
    """SIGINT/SIGTERM before the run directory exists: nothing to save, stop at once with one line."""
    print(f"interrupted by signal {signum} before training started; no run was written", file=sys.stderr)
    raise SystemExit(128 + signum)


class StopRequest:
    """Catches SIGINT/SIGTERM (Ctrl-C, preemption) so that the loop can finish the env step or update
    under way, save and exit; `signum` is the first signal received (None: none yet)."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.catch)

    def catch(self, signum, frame):
        self.signum = self.signum or signum


def ignore_signals():
    """Once the run is saved for good: Python drops its handlers while it shuts down, so a signal then would
    kill the process (status -15, no message) after all was done; ignored, the run ends as it was going to."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class Run:
    """One training run. Built from the arguments, it knows its name and whether it goes on in its
    checkpoint's directory; it writes nothing until start(), which restores a resumed run's state, claims the
    run directory and opens the logs. The training loop then tells it where each update starts and ends,
    and it saves checkpoints (periodic, best, on a signal, on a non-finite abort, final)."""

    def __init__(self, args, ckpt, script):
        self.args, self.ckpt, self.script = args, ckpt, script
        name = ckpt["run_name"] if ckpt else new_run_name(args)
        why = ckpt and not_in_place(RUNS / name, args.resume, ckpt, script)
        self.new = ckpt is None or bool(why)
        if ckpt and self.new:
            name = new_run_name(args)
            print(f"{why}: going on in a new run, {RUNS / name}, so that nothing of {ckpt['run_name']} is overwritten")
        self.name = name
        if args.capture_video:  # gymnasium's recorder makes videos/<name> when the envs are built: checked before
            video_dir = Path("videos") / name
            blocked = next(
                (p for p in [*reversed(video_dir.parents[:-1]), video_dir] if p.exists() and not p.is_dir()), None
            )
            if blocked is not None:
                fail(f"--capture-video writes into {video_dir}, but {blocked} is a file")
        # a checkpoint from elsewhere cannot choose where files are written (SHELM's embeddings_dir)
        self.may_write_output_dirs = not ckpt or checkpoints.may_write_output_dirs(
            args, ckpt["args"], script.OUTPUT_DIRS
        )

    def start(self, agent, optimizer, encoder, reward_norm):
        """Restore a resumed run (weights, optimizer, encoder state, reward normalisation, RNG states, counters),
        claim the run directory (the first write) and open the logs. Returns (first iteration, global_step)."""
        args, ckpt = self.args, self.ckpt
        self.agent, self.optimizer, self.encoder, self.reward_norm = agent, optimizer, encoder, reward_norm
        iteration, global_step, self.best_return, returns = 0, 0, -math.inf, []
        wandb_id = None
        if ckpt:
            iteration, global_step, self.best_return, returns = checkpoints.restore(
                ckpt, args.resume, agent, optimizer, encoder, reward_norm
            )
            wandb_id = None if self.new else ckpt["wandb_id"]
            print(f"resuming {self.name} at step {global_step} (update {iteration} of {args.num_iterations})")
        self.recent_returns = collections.deque(returns, maxlen=100)  # model_best.pt: their mean improved
        self.nonfinite_in_row = 0
        self.stop = StopRequest()  # from here on a signal is saved for: the run directory is about to exist
        self.dir, self.lock = claim_run_dir(self.name, self.new)
        envs = reward_norm.unwrapped  # the vector env under the wrappers: with --async-envs, a dead worker's line
        if isinstance(envs, env_suites.AsyncVectorEnv):  # says where the run's last good state is
            envs.checkpoint_note = self.checkpoint_note
        self.name = self.dir.relative_to(RUNS).as_posix()
        # another process may have written the run's checkpoints between __init__ and the claim
        written = any((self.dir / name).exists() for name in CHECKPOINT_FILES)
        if not self.new and written and not_in_place(self.dir, args.resume, ckpt, self.script):
            fail(f"{self.dir / 'checkpoint.pt'} was written by another process meanwhile; resume it instead")
        if ckpt and not self.new and args.capture_video:
            keep_earlier_videos(Path("videos") / self.name, global_step)
        self.writer, self.videos, wandb_id = open_logs(args, self.dir, self.name, wandb_id, global_step, resumed=ckpt)
        meta = {"algorithm": self.script.ALGORITHM, "env_id": args.env_id, "versions": versions()}
        self.info = {
            "algorithm": self.script.ALGORITHM,
            "args": asdict(args),
            "meta": meta,
            "run_name": self.name,
            "wandb_id": wandb_id,
        }
        self.progress = None
        if args.progress_bar:
            from tqdm import tqdm

            total = args.num_iterations * args.batch_size
            self.progress = tqdm(total=total, initial=global_step, unit="step", dynamic_ncols=True)
        return iteration + 1, global_step

    # ---- the training loop's calls --------------------------------------------------------------

    def update_starts(self, iteration, global_step):
        """Remember where update `iteration` starts (the end of the previous one): a stop during this update
        saves that state. Stops now if a signal came during the last update's logging."""
        self.resume_state = self.state(iteration - 1, global_step)
        self.exit_if_stopped()

    def exit_if_stopped(self):
        """After a signal: save where the update under way started and exit. The update has not changed the
        weights yet (it is called during the rollout), so they belong to that state."""
        if self.stop.signum is None:
            return
        self.save("checkpoint.pt", self.resume_state)
        self.writer.close()
        ignore_signals()
        resume = self.dir / "checkpoint.pt"
        print(f"\ninterrupted by signal {self.stop.signum}; resume with --resume {resume}", file=sys.stderr)
        sys.exit(128 + self.stop.signum)

    def nonfinite(self, loss, grad_norm, iteration, global_step):
        """True if the minibatch's loss or gradient norm is not finite: the caller skips its update, so that one
        bad minibatch does not poison the weights. After --nonfinite-limit in a row the run saves its state to
        checkpoint_nonfinite.pt and stops with one line."""
        import torch

        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.nonfinite_in_row = 0
            return False
        self.nonfinite_in_row += 1
        message = f"non-finite loss or gradient at step {global_step}: update skipped"
        warnings.warn(f"{message} ({self.nonfinite_in_row} in a row)", stacklevel=2)
        if self.nonfinite_in_row >= self.args.nonfinite_limit:
            # saved as the end of this iteration: its rollout is complete, and the counters in the checkpoint
            # must say so (global_step == iteration * batch_size) for a resume to add up
            self.abort(
                f"{self.nonfinite_in_row} non-finite losses or gradients in a row at step {global_step}",
                self.state(iteration, global_step),
            )
        return True

    def abort(self, reason, state, refused=None):
        """Stop a run that cannot go on (non-finite updates, a state --resume would refuse) with one line and exit
        status 1: its state goes to checkpoint_nonfinite.pt, for inspection only (the line says when --resume
        refuses it, unless `refused`, the reason, says so already); checkpoint.pt stays the last good state."""
        path = self.dir / "checkpoint_nonfinite.pt"
        ckpt = self.checkpoint(state)
        note = ""
        if refused is None:
            refused = checkpoints.refusal(ckpt, path, self.script, self.args.env_id)
            note = f"; --resume refuses it: {refused}" if refused else ""
        checkpoints.save(path, ckpt)
        self.writer.close()
        fail(f"{reason}; state saved to {path} ({self.checkpoint_note()}){note}")

    def checkpoint_note(self):
        """Where the run's last good state is, for a line that stops the run."""
        last = self.dir / "checkpoint.pt"
        return f"last periodic checkpoint: {last}" if last.exists() else "no periodic checkpoint before it"

    def update_done(self, iteration, global_step):
        """After update `iteration` is logged: model_best.pt when the mean of the last 100 returns improved
        (--save-model), checkpoint.pt every --checkpoint-every updates, the progress bar and wandb's videos."""
        args = self.args
        if self.videos is not None:
            self.videos.log_new()
        mean_return = float(sum(self.recent_returns) / len(self.recent_returns)) if self.recent_returns else math.nan
        if self.progress is not None:
            self.progress.update(global_step - self.progress.n)
            self.progress.set_postfix(ret=f"{mean_return:.3f}")
        # no checkpoint while non-finite updates are being skipped: the weights may have diverged, and checkpoint.pt
        # is the last good state that the non-finite abort points to
        skipping = self.nonfinite_in_row > 0
        new_best = bool(self.recent_returns) and mean_return > self.best_return and not skipping
        if new_best:
            self.best_return = mean_return
        state = self.state(iteration, global_step)
        if new_best and args.save_model:
            self.save("model_best.pt", state)
        if args.checkpoint_every and iteration % args.checkpoint_every == 0 and not skipping:
            self.save("checkpoint.pt", state)

    def finish(self, global_step):
        """The end of training: checkpoint.pt, model_final.pt (--save-model or --upload-model), and with
        --upload-model the evaluation (logged as eval/episodic_return) and the upload; the logs closed. Close the
        envs before: the video under way is written then."""
        args = self.args
        final = self.state(args.num_iterations, global_step)
        if self.nonfinite_in_row:  # the last update ended in skipped minibatches: the run has not recovered
            self.abort(
                f"the run ended with {self.nonfinite_in_row} non-finite losses or gradients in a row at step "
                f"{global_step} (their updates were skipped)",
                final,
            )
        self.save("checkpoint.pt", final)
        if args.save_model or args.upload_model:
            self.save("model_final.pt", final)
            print(f"model saved to {self.dir / 'model_final.pt'}")
        if self.progress is not None:
            self.progress.close()
        if self.videos is not None:
            self.videos.log_new()
        if args.upload_model:
            from helm_utils import evaluation

            final_model = self.dir / "model_final.pt"
            returns, video = evaluation.evaluate(
                final_model, self.script, args.eval_episodes, args.cuda, env_id=args.env_id
            )
            for idx, episodic_return in enumerate(returns):
                self.writer.add_scalar("eval/episodic_return", episodic_return, idx)
        self.writer.close()
        if args.upload_model:
            from helm_utils import hub

            repo_name = f"{args.env_id}-{args.exp_name}-seed{args.seed}"
            repo_id = f"{args.hf_entity}/{repo_name}" if args.hf_entity else repo_name
            hub.push_to_hub(self.dir / "model_final.pt", repo_id, returns, video, self.script)
        if args.track:
            import wandb

            wandb.finish()  # the last tensorboard events synced before the process ends
        ignore_signals()
        os.close(self.lock)  # the run is saved for good: its directory is free for the next process (--resume)

    # ---- checkpoints --------------------------------------------------------------------------------

    def state(self, iteration, global_step):
        return checkpoints.training_state(
            iteration, global_step, self.best_return, self.recent_returns, self.reward_norm, self.encoder
        )

    def checkpoint(self, state):
        weights = {"agent": self.agent.state_dict(), "optimizer": self.optimizer.state_dict()}
        return {"format": checkpoints.FORMAT, **self.info, **weights, **state}

    def save(self, name, state):
        """Write checkpoint `name`, after the checks --resume applies: a state that fails them (weights or
        statistics that overflowed) never replaces a file; the run stops instead (abort)."""
        self.writer.flush()  # the log holds all that the checkpoint covers, even if the process is killed next
        ckpt = self.checkpoint(state)
        refused = checkpoints.refusal(ckpt, self.dir / name, self.script, self.args.env_id)
        if refused:
            reason = refused.removeprefix(f"checkpoint {self.dir / name}: ")
            self.abort(f"the state at step {state['global_step']} fails --resume's checks ({reason})", state, refused)
        checkpoints.save(self.dir / name, ckpt)


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


CHECKPOINT_FILES = ("checkpoint.pt", "model_final.pt", "model_best.pt", "checkpoint_nonfinite.pt")


def not_in_place(run_dir, resume, ckpt, script):
    """Why resuming `resume` may not go on in its run's directory (None: it may). It may when the directory does
    not exist yet (a checkpoint from elsewhere), when `resume` is the run's checkpoint.pt, or when the run's latest
    state (its checkpoint.pt, else the checkpoint files it has) is the same run (the same defining arguments:
    another run's checkpoint that names it must not rewrite its files) and not ahead of `resume` (going on from
    model_best.pt of a run that went further would move the run's files back in time)."""
    import torch

    if not run_dir.exists() and not run_dir.is_symlink():
        return None
    latest = run_dir / "checkpoint.pt"
    if latest.is_file() and latest.samefile(resume):
        return None
    own = next((run_dir / name for name in CHECKPOINT_FILES if (run_dir / name).exists()), None)
    if own is None:
        inside = Path(resume).resolve().parent == run_dir.resolve()
        return None if inside else f"{run_dir} exists and holds no checkpoint to compare {resume} with"
    try:
        saved = torch.load(own, map_location="cpu", weights_only=True, mmap=True)
        step, args = saved.get("global_step"), saved.get("args")
        # completed as `ckpt` was (checkpoints.check): an older file of the same run lacks the same arguments
        args = checkpoints.complete_args(saved, script)[0] if isinstance(args, dict) else None
    except Exception:  # noqa: BLE001 - whatever it holds, it is not to be overwritten
        return f"{own} cannot be read"
    output_dirs = script.OUTPUT_DIRS
    if not isinstance(args, dict) or checkpoints.defining_args(args, output_dirs) != checkpoints.defining_args(
        ckpt["args"], output_dirs
    ):
        return f"{own} is of another run than {resume} (other arguments)"
    if not isinstance(step, int) or step > ckpt["global_step"]:
        return f"{own} is further than {resume}"
    return None


def claim_run_dir(run_name, new):
    """runs/<run_name>, locked for this process's life: a second process on the same run gets one line instead
    of mixing its files in. A new run's directory is created here, never reused: if two runs started in the
    same second take the name, the second gets it with a suffix -2 (-3, ...)."""
    parts = Path(run_name).parts
    links = [RUNS.joinpath(*parts[: i + 1]) for i in range(len(parts)) if RUNS.joinpath(*parts[: i + 1]).is_symlink()]
    if links:  # runs/ itself may be a link (to a larger disk); what lies in it is a run's own
        fail(f"{links[0]} is a link; a run directory under {RUNS} must be a directory of its own")
    try:
        if new:
            (RUNS / run_name).parent.mkdir(parents=True, exist_ok=True)
            for n in itertools.count(1):
                run_dir = RUNS / (run_name if n == 1 else f"{run_name}-{n}")
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    continue
        else:
            run_dir = RUNS / run_name
            run_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(run_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        fail(f"cannot create the run directory {RUNS / run_name} in {os.getcwd()}: {e.strerror or e}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"{run_dir} is in use by another process (it holds {run_dir / '.lock'}); one run, one process")
    return run_dir, lock


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


def open_logs(args, run_dir, run_name, wandb_id, global_step, resumed):
    """(tensorboard SummaryWriter, wandb's video log or None, wandb run id). With --track, wandb logs what the
    writer writes (a resumed run continues its wandb run) and, with --capture-video, the videos."""
    videos = None
    if args.track:
        import wandb

        # sync_tensorboard=True would wait 10 s at the end to guess the log directory
        wandb.tensorboard.patch(root_logdir=str(run_dir))
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=vars(args),
            name=run_name,
            id=wandb_id,  # None: a new run; a resumed run continues its checkpoint's
            resume="allow",
            save_code=True,
        )
        wandb_id = wandb.run.id
        if args.capture_video:
            videos = VideoLog(Path("videos") / run_name)
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops what an interrupted run logged after its last checkpoint: the steps after
    # global_step (the losses of the checkpoint's last update are logged at global_step itself)
    try:
        writer = SummaryWriter(str(run_dir), purge_step=global_step + 1 if resumed else None)
    except OSError as e:
        fail(f"cannot write the logs in {run_dir}: {e.strerror or e}")
    if not resumed:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n{}".format("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
        )
    return writer, videos, wandb_id


class VideoLog:
    """Hands the videos that RecordVideo writes into video_dir to wandb, each once. wandb's own hook
    (wandb.init(monitor_gym=True)) fails with gymnasium 1.x's RecordVideo."""

    def __init__(self, video_dir):
        self.video_dir = video_dir
        self.logged = self.on_disk()  # a resumed run's earlier videos were logged by the earlier process

    def on_disk(self):
        # with the modification time: a resumed run's recorder writes the same file names again
        return {path: path.stat().st_mtime_ns for path in sorted(self.video_dir.glob("*.mp4"))}

    def log_new(self):
        import wandb

        on_disk = self.on_disk()
        for path, mtime in on_disk.items():
            if self.logged.get(path) != mtime:
                wandb.log({"videos": wandb.Video(str(path), format="mp4")})
        self.logged = on_disk


def keep_earlier_videos(video_dir, global_step):
    """A resumed run's video recorder numbers its episodes from 0 again, in the same folder: the videos of the
    earlier processes go to a folder of their own first (videos/<run>/before-step-<S>/), where nothing replaces them."""
    earlier = sorted(p for p in video_dir.glob("*.mp4") if p.is_file()) if not video_dir.is_symlink() else []
    if not earlier:
        return
    try:
        for n in itertools.count(1):
            kept = video_dir / (f"before-step-{global_step}" + (f"-{n}" if n > 1 else ""))
            try:
                kept.mkdir()
                break
            except FileExistsError:
                continue
        for path in earlier:
            os.rename(path, kept / path.name)
    except OSError as e:
        fail(f"cannot keep the earlier videos of {video_dir} apart: {e.strerror or e}")
    print(f"the videos of the run before step {global_step} are kept in {kept}")


def versions():
    import importlib.metadata as md

    return {p: md.version(p) for p in ["torch", "gymnasium", "minigrid", "open_clip_torch"]} | {
        "python": sys.version.split()[0]
    }
