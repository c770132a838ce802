"""Files: written atomically, and read from elsewhere without running code or trusting their content.

Two writers, the same care: write_atomically for a file a run owns and replaces (its checkpoints, the embeddings
file, plots), write_new for an output beside others (enjoy.py's videos, heatmaps and traces), which never takes
the place of an existing file. Neither follows a link planted at the file's name. A tool whose outputs belong
together (a report's data, table and figure) checks where they go before its work (output_files) and replaces
them as a set once all are written (replace_together); read_json reads a tool's JSON input with every key, type,
length and bound checked."""

import contextlib
import errno
import itertools
import os
import re
import secrets
import tempfile
from pathlib import Path

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
        _fsync_dir(path.parent)
    except OSError as e:
        _remove(tmp)
        fail(f"could not write {path}: {e.strerror or e}; nothing was overwritten")
    except BaseException:
        _remove(tmp)
        raise


def output_dir(path, what):
    """The folder `path` (created if missing) for outputs, or one line naming `what` (the flag that chose it): it
    is a file, cannot be created (read-only or full file system, /proc) or cannot be written to."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot use {path} as the output folder ({what}): {e.strerror or e}")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"cannot write into the output folder {path} ({what}): it is read-only")
    return path


def output_files(folder, names, what):
    """Before any work: where a tool's outputs `names` go, or one line naming `what` (the flag that chose it). Refused:
    a folder that is a link (its target would be written into: give that folder), a file, one inside a file, one that
    cannot be made or written into (tried: a folder made and removed again in it, or in the nearest existing folder
    above it: a read-only file system, /proc, permissions); at any of `names`, a link, a folder or anything else that
    is not a plain file (the writers replace a plain file, nothing else). Nothing is created: a tool whose work then
    fails has written nothing. Returns the folder as a Path."""
    folder = Path(folder)
    if folder.is_symlink():
        fail(f"{what} {folder} is a link; outputs never go through a link: give the folder it points to")
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        where = "is not a folder" if existing == folder else f"lies inside {existing}, which is not a folder"
        fail(f"{what} {folder} {where}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as e:
        fail(f"{what} {folder}: cannot write into {existing}: {e.strerror or e}")
    for name in names:
        path = folder / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a link" if path.is_symlink() else "not a plain file"
            fail(f"{what}: {path} is {kind}, which an output never replaces; move it away or choose another {what}")
    return folder


def output_file(path, what):
    """output_files for one file: `path` as a Path, or one line before any work."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        fail(f"{what} {path} names a folder, not a file")
    existing = next(p for p in path.parents if p.exists() or p.is_symlink())
    if not existing.is_dir():
        fail(f"{what} {path} lies inside {existing}, which is not a folder")
    return output_files(path.parent, [path.name], what) / path.name


def replace_together(writes):
    """Write files that belong together, {path: write(f)}, as write_atomically writes one, but rename none over its
    path until all are written and fsynced: a failure (a full disk, an exception in a writer) replaces none of them
    and leaves no temporary file. Then the renames, each replacing a name, never a link's target (a crash between
    two of them, microseconds apart, would leave the earlier files of the set beside the later)."""
    temps, replaced, path = {}, [], None
    try:
        for path in writes:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        for path, write in writes.items():
            path = Path(path)
            fd, temps[path] = new_file(path)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
            replaced.append(path)
        for folder in {p.parent for p in temps}:
            _fsync_dir(folder)
    except OSError as e:
        for tmp in temps.values():
            _remove(tmp)
        kept = f"; {', '.join(map(str, replaced))} already replaced" if replaced else "; nothing was overwritten"
        fail(f"could not write {path}: {e.strerror or e}{kept}")
    except BaseException:
        for tmp in temps.values():
            _remove(tmp)
        raise


MAX_JSON_BYTES = 100 * 2**20  # a tool's JSON input (a probe's report, throughput results): kilobytes, not this


def read_json(path, schema, what):
    """The JSON file `path` validated as `schema` (parse_json), or one line naming `what` and the problem; returns
    (the validated content, the file's bytes)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            fail(
                f"{what} {path} takes {path.stat().st_size:,} bytes, more than the {MAX_JSON_BYTES:,} such a file takes"
            )
        data = path.read_bytes()
    except OSError as e:
        fail(f"{what} {path} cannot be read: {e.strerror or e}")
    return parse_json(data, schema, f"{what} {path}"), data


def parse_json(data, schema, what):
    """JSON text validated as `schema` (a type pydantic validates: TypedDicts, lists, tuples, Annotated bounds),
    strictly: every key, type, length and bound checked, no NaN or infinity where a number is declared, before
    anything uses it; or one line naming `what`, the first problem and where it lies (`results.2.delays.5`)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_json(data, strict=True)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "its top level"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        fail(f"{what} is not of the expected structure: {where}: {problem['msg']}{more}")


def new_file(path):
    """A temporary file of its own beside `path` (created exclusively under a random name, no link followed):
    (file descriptor, its path). The suffix is kept, for writers that choose the format by it (ffmpeg)."""
    name = path.with_name(f".{path.stem}.{secrets.token_hex(8)}.tmp{path.suffix}")
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), name


def publish(tmp, path):
    """Give the finished temporary file `tmp` the name `path`, or if that name is taken (a file, a directory or
    a link, dangling or not) the first free one of `stem-2.ext`, `stem-3.ext`, ...; never replaces anything.
    Returns the name given. link() refuses an existing name and follows no link at it; on a file system without
    hard links the name is claimed with an exclusive create first, then the temporary file renamed over that."""
    for n in itertools.count(1):
        target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(tmp, target)
            os.unlink(tmp)
            break
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            try:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            except FileExistsError:
                continue
            os.replace(tmp, target)
            break
    _fsync_dir(path.parent)
    return target


def write_new(path, write, by_name=False):
    """Write a new file as write_atomically does (a temporary file of its own, fsynced, then given its name), but
    never in the place of an existing file: when `path` exists the file gets the next free name (see publish),
    which is returned. write(f) writes to a binary file; with by_name, write(name) opens the file by its name
    itself (ffmpeg). A failure (a full disk, a read-only folder) leaves nothing behind and is one line."""
    path = Path(path)
    tmp = None
    try:
        fd, name = new_file(path)
        tmp = name
        if by_name:
            os.close(fd)
            write(str(name))
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        final = publish(name, path)
        tmp = None
        return final
    except OSError as e:
        _remove(tmp)
        fail(f"could not write {path}: {e.strerror or e}; nothing was written")
    except BaseException:
        _remove(tmp)
        raise


class NewFile:
    """A file written as it goes (a trace, row by row), published under its name by close() as write_new does:
    until then it is a temporary file of its own, so its name never points to half a file or to another's."""

    def __init__(self, path, mode="w"):
        self.path, self.written = Path(path), None
        try:
            fd, self.tmp = new_file(self.path)
        except OSError as e:
            fail(f"could not write {self.path}: {e.strerror or e}")
        self.file = os.fdopen(fd, mode, newline="" if "b" not in mode else None)

    def write(self, data):
        try:
            self.file.write(data)
            self.file.flush()
        except OSError as e:
            self.discard()
            fail(f"could not write {self.path}: {e.strerror or e}; nothing was written")

    def close(self):
        """Publish the file; returns its name (the next free one when `path` exists)."""
        if self.written is None and not self.file.closed:
            try:
                os.fsync(self.file.fileno())
                self.file.close()
                self.written = publish(self.tmp, self.path)
            except OSError as e:
                self.discard()
                fail(f"could not write {self.path}: {e.strerror or e}; nothing was written")
        return self.written

    def discard(self):
        with contextlib.suppress(OSError):
            self.file.close()
        _remove(self.tmp)


class NotAPlainFile(OSError):
    """What open_plain raises where a link, a folder, a FIFO or a device lies at a file's name."""


def what_lies_at(path):
    """None where `path` is absent or a plain file; otherwise what lies there instead, in words ("a link", "a
    folder", ...): a name a tool writes or locks that holds something else (the link itself, not its target)."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "a link" if os.path.exists(path) else "a dangling link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return None if stat.S_ISREG(mode) else "not a plain file (a FIFO, a socket or a device)"


def open_plain(path, append=False, create=True):
    """A descriptor for writing to the plain file `path` (a log appended to, a lock file): created if missing with
    create (else FileNotFoundError), never through a link at its name, never a folder, FIFO or device (opened
    without blocking, then checked: a FIFO with no reader would hang the open). Raises NotAPlainFile naming what
    lies there instead, OSError for other failures."""
    import stat

    kind = what_lies_at(path)
    if kind:
        raise NotAPlainFile(errno.EINVAL, f"it is {kind}", str(path))
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_CREAT if create else 0) | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:  # something else took the name since the look above
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise NotAPlainFile(e.errno, f"it is {what_lies_at(path) or 'not a plain file'}", str(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAPlainFile(errno.EINVAL, "it is not a plain file", str(path))
    os.set_blocking(fd, True)
    return fd


def _fsync_dir(folder):
    directory = os.open(folder, os.O_RDONLY)  # the rename itself survives a power cut too
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove(path):
    if path is not None:  # None: not created (the name was taken)
        with contextlib.suppress(OSError):  # already renamed, or its directory is not one
            path.unlink()


def read_state_dict(path):
    """Tensors of a safetensors or torch checkpoint file, all finite; never unpickles arbitrary objects."""
    import torch  # here: the module's writers serve tools that run without torch (benchmark/gpu_check.py)

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
    validate_tensors(state, f"weights {path}", float_dtypes())
    return state


def float_dtypes():
    import torch

    return torch.float16, torch.bfloat16, torch.float32, torch.float64


def validate_tensors(state, what, dtypes=None):
    """A state dict: a flat dict of named dense CPU tensors of real numbers (of `dtypes`, if given), none of
    them NaN or infinite. Loading casts a tensor to its parameter's dtype without a word (a complex one with
    a warning, dropping its imaginary part): a dtype other than the one used is refused here instead."""
    import torch

    if not isinstance(state, dict):
        fail(f"{what} hold a {type(state).__name__}, not a dict of named tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            fail(f"{what}: entry {key!r} is a {type(value).__name__}, not a named tensor")
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            fail(f"{what}: tensor {key} is a {value.layout} tensor on {value.device}, not a dense one")
        if value.is_complex() or (dtypes is not None and value.dtype not in dtypes):
            wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes or float_dtypes())
            fail(f"{what}: tensor {key} is {str(value.dtype).removeprefix('torch.')}, not {wanted}")
        if value.is_floating_point() and not torch.isfinite(value).all():
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
