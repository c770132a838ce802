"""Files: written atomically, and read from elsewhere without running code or trusting their content."""

import contextlib
import os
import re
import secrets
from pathlib import Path

import torch

from helm_utils import fail

MAX_NAME_BYTES = 200  # of a run directory's name; file systems allow 255, the rest is for suffixes


def write_atomically(path, write):
    """Call write(f) on a new temporary file in the same directory, fsync, rename it over `path`, fsync the
    directory: a crash or a full disk leaves any previous file untouched and no half-written one behind.
    The temporary file is created anew (O_EXCL, a random name), so a link planted in the directory
    is never followed; the rename replaces the name `path`, even if it is a link, never a link's target."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        # O_EXCL: a new file or an error, even if a link stands at that name; mode 0o666 less the umask
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        tmp = name  # ours to remove from here on
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut too
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        _remove(tmp)
        fail(f"could not write {path}: {e.strerror or e}; nothing was overwritten")
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if path is not None:  # None: not created (the name was taken)
        with contextlib.suppress(OSError):  # already renamed, or its directory is not one
            path.unlink()


def read_state_dict(path):
    """Tensors of a safetensors or torch checkpoint file, all finite; never unpickles arbitrary objects."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        fail(f"cannot read weights {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    validate_tensors(state, f"weights {path}")
    return state


def validate_tensors(state, what):
    """A state dict: a flat dict of named tensors, none of them NaN or infinite."""
    if not isinstance(state, dict):
        fail(f"{what} hold a {type(state).__name__}, not a dict of named tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            fail(f"{what}: entry {key!r} is a {type(value).__name__}, not a named tensor")
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            fail(f"{what}: tensor {key} holds NaN or infinite values")


def validate_run_name(run_name, what):
    """A name that keeps the run directory under runs/: relative, without '..', printable UTF-8, not too long.
    Refused, not repaired: a name from a checkpoint or the command line is used as given or not at all."""
    if not isinstance(run_name, str) or not run_name:
        fail(f"{what} must be a non-empty string, got {run_name!r}")
    try:
        parts = [part.encode("utf-8") for part in run_name.split("/")]
    except UnicodeEncodeError:
        fail(f"{what} {run_name!r} is not valid UTF-8")
    if any(part in (b"", b".", b"..") for part in parts) or re.search(r"[\x00-\x1f\x7f\\]", run_name):
        fail(f"{what} {run_name!r} leaves runs/: it must be relative, without '..', control characters or '\\'")
    if max(len(part) for part in parts) > MAX_NAME_BYTES:
        fail(f"{what} is {max(len(part) for part in parts)} bytes long; at most {MAX_NAME_BYTES} make a directory name")
