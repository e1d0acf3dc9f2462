"""Writing outputs without losing anything the user did not ask to replace.

- A file is written to a temporary sibling, flushed to disk and renamed over its name: a reader never sees
  half a file, and a failed write leaves the old file as it was.
- A directory (a bundle, a Triton repository, the built-in benchmark) is built in a temporary sibling and
  renamed into place at the end. The rename never replaces what appeared meanwhile (two runs into the same
  absent output: the second fails); with overwrite, it replaces only a directory that `ours` recognises,
  never a file, a foreign directory or one holding an input of the command.
- Temporaries are removed on every failure, and an OSError becomes one line that says what ran out or was
  refused (DiskFullError for a full disk or quota).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from crnet.errors import CRNetError


class OutputError(CRNetError):
    """An output cannot be written where it was asked for."""


class FolderBusyError(OutputError):
    """Another command is writing the output folder now (only_writer)."""


class DiskFullError(OutputError):
    """The device or the user's quota ran out of space while writing an output."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def parse_json(text: str | bytes) -> object:
    """json.loads, where nesting too deep for the parser (RecursionError) is a ValueError like any other
    damage: every reader of crnet's JSON files treats ValueError as "damaged" or "not ours"."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def explain(error: OSError, path: str | Path, doing: str = "writing") -> OutputError:
    """One line for an OSError met while writing `path`."""
    if error.errno in DISK_FULL:
        return DiskFullError(f"no space left on the device {doing} {path}; free some space and run again")
    reason = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
        errno.EISDIR: "it is a directory",
        errno.ENAMETOOLONG: "the name is too long",
    }.get(error.errno, error.strerror or str(error))
    return OutputError(f"cannot write {path}: {reason}")


NAME_MAX = 255  # bytes in one file name, on Linux's file systems
RANDOM = 8  # the characters that mkstemp and mkdtemp add


def hidden_prefix(name: str, tag: str, suffix: str = "") -> str:
    """`.NAME.TAG`, a temporary's prefix beside NAME, with NAME cut short where the temporary's whole name
    would pass NAME_MAX: a name that fits must not fail for its temporary, after all the work is done."""
    return f".{cut_to_bytes(name, NAME_MAX - len(f'..{tag}{suffix}'.encode()) - RANDOM)}.{tag}"


def cut_to_bytes(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, whole characters."""
    return text.encode()[:limit].decode(errors="ignore")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def check_not_input(out: Path, inputs: Sequence[str | Path], option: str = "--out") -> None:
    """Refuse an output that is, or would replace a directory holding, one of the command's inputs, or that
    lies inside an input directory (a dataset, a bundle), which writing it would change."""
    resolved = Path(os.path.realpath(os.path.abspath(out)))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if source == resolved or resolved in source.parents:
            raise OutputError(f"{option} {out} would replace the input {given}; choose another {option}")
        if source in resolved.parents and source.is_dir():
            raise OutputError(f"{option} {out} is inside the input {given}; choose another {option}")


def holds_only(folder: Path, names: Iterable[str]) -> bool:
    """Whether everything in `folder` is one of `names` (paths relative to it; a named folder counts with
    all it holds, a folder on the way to a named path for itself): an earlier output of ours to which
    nothing was added, which an overwrite can replace without losing anything else."""
    names = list(names)
    if not all(isinstance(name, str) for name in names):
        return False  # a manifest's entry that is not a file name
    allowed = {PurePosixPath(name) for name in names}
    if any(not name.parts or name.is_absolute() or ".." in name.parts for name in allowed):
        return False  # "", "." or ".." would cover the whole folder: a damaged or crafted listing
    on_the_way = {parent for name in allowed for parent in name.parents}
    for path in folder.rglob("*"):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if relative in allowed or allowed & set(relative.parents):
            continue
        if not (relative in on_the_way and path.is_dir() and not path.is_symlink()):
            return False
    return True


def ensure_parent(path: Path) -> None:
    """Create the directory a file will be written into, or say in one line why it cannot be."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot write {path}: a part of {parent} is a file, not a directory") from None
    except OSError as error:
        raise explain(error, path) from None


def check_writable_file(
    path: Path,
    inputs: Sequence[str | Path] = (),
    option: str = "--json",
    ours: Callable[[Path], bool] | None = None,
    what: str = "",
) -> None:
    """Before a long run: the file can be written (its folder exists or can be made, and takes a file),
    is not a directory and is not one of the inputs; with `ours`, a file already there is one it
    recognises as an earlier `what` (check_replaceable_file). Nothing is left behind by the check."""
    try:
        is_dir = path.is_dir()
    except OSError as error:  # a name too long, a loop of links: what writing it would meet
        raise explain(error, path) from None
    if is_dir:
        raise OutputError(f"{option} {path} is a directory; give a file name")
    check_not_input(path, inputs, option)
    if ours is not None:  # before the place is checked, which stages a folder beside the path
        check_replaceable_file(path, ours, what, option)
    check_writable_place(path)


def check_replaceable_file(path: Path, ours: Callable[[Path], bool], what: str, option: str) -> None:
    """A file already at `path` is replaced only when `ours` recognises it as an earlier output of the same
    kind (a bench JSON by its schema, say): never another file (a photo beside a JSON that names the
    chart), a symbolic link (the rename would replace the link) or a device."""
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; give the file itself, or another name")
    if not path.is_file():
        raise OutputError(f"{option} {path} is not a regular file; choose another {option}")
    if not ours(path):
        raise OutputError(
            f"{option} {path} exists and is not an earlier {what}; choose another {option} (crnet replaces "
            f"only its own {what})"
        )


def check_writable_place(path: Path) -> None:
    """Before a long run: an output can be written or staged beside `path` (its folder exists or can be
    made, and takes a new entry). Nothing is left behind by the check."""
    created = [p for p in reversed(path.parents) if not p.exists()]
    try:
        ensure_parent(path)
        os.rmdir(tempfile.mkdtemp(prefix=hidden_prefix(path.name, "check-"), dir=path.parent))
    except OSError as error:
        raise explain(error, path) from None
    finally:
        for folder in reversed(created):  # the check itself leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: Path) -> None:
    """Give a file or folder made by mkstemp / mkdtemp (0600 / 0700) the mode that open() and mkdir()
    give, under the user's umask: outputs were readable by their owner only (a bundle served by another
    account, a dataset shared on a machine)."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | Path, replaces: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over `path`,
    on any failure removed. OSErrors become OutputError / DiskFullError. `replaces(path)` raises where a
    file at `path` must not be replaced: checked at the rename, since a file may have come there during
    the run (the commands check at their start too)."""
    path = Path(path)
    ensure_parent(path)
    try:
        handle, name = tempfile.mkstemp(
            dir=path.parent, prefix=hidden_prefix(path.name, "", ".tmp"), suffix=".tmp"
        )
        os.close(handle)
        as_created(Path(name))
    except OSError as error:
        raise explain(error, path) from None
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        if replaces is None:
            os.replace(temporary, path)
        else:
            _replace_checked(temporary, path, replaces)
    except OSError as error:
        _remove(temporary)
        raise explain(error, path) from None
    except BaseException:
        _remove(temporary)
        raise


def _replace_checked(temporary: Path, path: Path, replaces: Callable[[Path], None]) -> None:
    try:
        rename_noreplace(temporary, path)  # nothing there: nothing to check, and nothing can come first
        return
    except FileExistsError:
        pass
    replaces(path)
    os.replace(temporary, path)


def write_bytes(path: str | Path, data: bytes, replaces: Callable[[Path], None] | None = None) -> Path:
    with atomic_file(path, replaces) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, replaces: Callable[[Path], None] | None = None) -> Path:
    return write_bytes(path, text.encode(), replaces)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename that fails with FileExistsError when `target` exists, atomically where the kernel and file
    system support renameat2(RENAME_NOREPLACE), else with a check just before the rename."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def check_output_dir(
    out: Path,
    *,
    what: str,
    ours: Callable[[Path], bool],
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    option: str = "--out",
    replaces_own: bool = False,
) -> bool:
    """Whether `out` holds an earlier output to replace (False: absent or empty). OutputError when it must
    not be touched: a file, a foreign or non-empty directory without overwrite, or one holding an input.
    `replaces_own`: the command replaces an earlier output of its own without being asked (infer, demo),
    and has no --overwrite to mention."""
    check_not_input(out, inputs, option)
    if not os.path.lexists(out):
        return False
    if out.is_symlink():
        raise OutputError(
            f"{option} {out} is a symbolic link, not a {what} directory; give the directory itself"
        )
    if not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a {what} directory; choose another path")
    if not any(out.iterdir()):
        return False
    if replaces_own and not ours(out):
        raise OutputError(
            f"{option} {out} holds other files than an earlier {what}; choose a new or empty folder"
        )
    if not ours(out):  # said first: --overwrite would not help
        raise OutputError(
            f"refusing to replace {out}: it is not a {what}, or holds other files too (--overwrite replaces "
            f"only a {what} written by crnet, with nothing added); choose another {option}"
        )
    if not (overwrite or replaces_own):
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    return True


_LOCKS: set[int] = set()  # the descriptors only_writer holds, which a forked child must not keep


def _close_locks_in_child() -> None:
    for handle in _LOCKS:  # the child's copies: the lock stays the parent's, and ends with it
        with contextlib.suppress(OSError):
            os.close(handle)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


@contextlib.contextmanager
def only_writer(folder: Path, command: str) -> Iterator[None]:
    """While the block runs, this process is the only `command` writing `folder`: an exclusive flock on
    the folder itself (no lock file to leave behind; released however the process ends, forked children
    such as data loader workers do not keep it). A second one is refused at once."""
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise explain(error, folder) from None
    _LOCKS.add(handle)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(
                f"{folder} is being written by another {command} now; wait for it to end, or choose another "
                "--out"
            ) from None
        except OSError:  # a file system without locks: nothing to guard with
            pass
        yield
    finally:
        _LOCKS.discard(handle)
        os.close(handle)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block has ended, then act as usual: for steps that must not be
    left half done. Python runs signal handlers in the main thread whichever thread the kernel picks, so
    the handlers are swapped for ones that only note the signal (blocking the signals in this thread, as
    this did first, let another thread take them: tqdm's monitor, ONNX Runtime's pool). Off the main
    thread, where handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {number: signal.signal(number, lambda n, frame: noted.append(n)) for number in DEFERRED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if noted:
            handler = previous[noted[0]]
            if callable(handler):
                handler(noted[0], None)  # Ctrl-C's KeyboardInterrupt, here
            elif handler in (None, signal.SIG_DFL):
                signal.raise_signal(noted[0])


DEFERRED = (signal.SIGINT, signal.SIGTERM)


class StagedDirectory:
    """A directory output built in a temporary sibling and committed by rename.

    `ours(path)` says whether an existing directory is a previous output of the same kind (a bundle with
    its manifest, say): only such a directory is replaced, and only with overwrite (or, with
    `replaces_own`, always: check_output_dir). An empty directory counts as absent. `inputs` are paths the
    command reads: an output that is or holds one is refused.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        what: str,
        ours: Callable[[Path], bool],
        overwrite: bool = False,
        inputs: Sequence[str | Path] = (),
        option: str = "--out",
        replaces_own: bool = False,
    ):
        self.out, self.what, self.ours, self.overwrite, self.option = Path(out), what, ours, overwrite, option
        self.inputs, self.replaces_own = inputs, replaces_own
        self._check_target()
        self.created = [folder for folder in reversed(self.out.parents) if not folder.exists()]
        ensure_parent(self.out)
        try:
            with signals_deferred():  # not made and then lost before it has a name here
                prefix = hidden_prefix(self.out.name, "partial-")
                self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
            as_created(self.root)
        except OSError as error:
            raise explain(error, self.out) from None

    def _check_target(self) -> bool:
        return check_output_dir(
            self.out,
            what=self.what,
            ours=self.ours,
            overwrite=self.overwrite,
            inputs=self.inputs,
            option=self.option,
            replaces_own=self.replaces_own,
        )

    def commit(self) -> Path:
        """Rename the staged directory into place (see the class docstring); the path written."""
        out = self.out
        try:
            replace = self._check_target()  # again: something may have appeared since the start
            if not replace and out.is_dir():
                out.rmdir()  # empty: nothing to lose (fails, and is reported, if a file appeared)
            if not replace:
                rename_noreplace(self.root, out)
                return out
            with signals_deferred():  # a Ctrl-C between the two renames would leave no output at all
                old = Path(tempfile.mkdtemp(prefix=hidden_prefix(out.name, "old-"), dir=out.parent))
                os.rename(out, old / "previous")
                try:
                    rename_noreplace(self.root, out)
                except OSError:
                    os.rename(old / "previous", out)  # put the previous output back
                    os.rmdir(old)
                    raise
                shutil.rmtree(old, ignore_errors=True)  # whole: no half-removed earlier output is left
            return out
        except FileExistsError:
            self.abort()
            raise OutputError(
                f"{out} appeared while this run was writing it (another run?); pass --overwrite to replace "
                "it, or choose another path"
            ) from None
        except OSError as error:
            self.abort()
            raise explain(error, out) from None
        except BaseException:
            self.abort()
            raise

    def commit_into(self, names: Sequence[str]) -> Path:
        """Move the staged entries into OUT and keep OUT's other entries (a demo's training run): OUT's
        `names` are all replaced in one step, so that OUT never holds some of one run's outputs beside some
        of another's. The first name (a marker that says what OUT is) goes first and comes back last. A new
        or empty OUT is renamed into place whole."""
        out = self.out
        try:
            replace = self._check_target()  # again: something may have appeared since the start
        except BaseException:
            self.abort()
            raise
        if not replace:
            return self.commit()
        moved_out, moved_in = [], []
        with signals_deferred():  # all of it, the earlier entries' removal included
            try:
                earlier = Path(tempfile.mkdtemp(prefix=".earlier-", dir=self.root))
                for name in names:
                    if os.path.lexists(out / name):
                        os.rename(out / name, earlier / name)
                        moved_out.append(name)
                for name in reversed(names):
                    if os.path.lexists(self.root / name):
                        os.rename(self.root / name, out / name)
                        moved_in.append(name)
            except OSError as error:
                try:
                    for name in moved_in:
                        os.rename(out / name, self.root / name)
                    for name in moved_out:
                        os.rename(earlier / name, out / name)  # OUT as it was
                finally:
                    self.abort()
                raise explain(error, out) from None
            _remove(self.root)
        return out

    def abort(self) -> None:
        _remove(self.root)
        for folder in reversed(self.created):  # the folders made for the output, if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> StagedDirectory:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()
            if isinstance(error, OSError) and self._writing(error):
                raise explain(error, self.out) from None
            if isinstance(error, OutputError) and str(self.root) in str(error):  # a file's, explained
                # named where the user asked for it, not in the hidden folder that is gone now
                raise type(error)(str(error).replace(str(self.root), str(self.out))) from None

    def _writing(self, error: OSError) -> bool:
        """Whether `error` was met on the output (or names no file): another file's error (a cache folder's,
        an input's) keeps its own name, for the command's line to say."""
        if error.filename is None:
            return True
        named = Path(os.fsdecode(error.filename)).absolute()
        return any(
            named == place or place in named.parents for place in (self.root.absolute(), self.out.absolute())
        )
