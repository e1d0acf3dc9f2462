"""crnet.files: outputs that never lose a user's file, leave no temporary behind, and say what ran out.

A full disk is a real one where the test may mount a small tmpfs (root on Linux), else a write that raises
ENOSPC; a read-only place is a read-only tmpfs, else a directory without write permission (not for root).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from crnet import files
from crnet.checkpoint import load, save_atomic
from crnet.files import DiskFullError, OutputError, StagedDirectory, atomic_file, write_bytes
from tests.places import fill_disk_with, leftovers, read_only_place, release


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under root."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def read_only(tmp_path):
    """A directory nothing can be written into."""
    place = read_only_place(tmp_path / "read-only")
    if place is None:
        pytest.skip("root writes anywhere, and this machine lets the test mount no read-only file system")
    yield place
    release(place)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path) -> None:
    path = tmp_path / "out" / "a.json"
    write_bytes(path, b"first")
    with pytest.raises(RuntimeError, match="half way"), atomic_file(path) as temporary:
        temporary.write_bytes(b"partial")
        raise RuntimeError("half way")
    assert path.read_bytes() == b"first" and leftovers(tmp_path) == []
    write_bytes(path, b"second")
    assert path.read_bytes() == b"second" and leftovers(tmp_path) == []


def test_full_disk_during_a_checkpoint(small_disk, tmp_path, monkeypatch) -> None:
    """The previous checkpoint survives, no temporary is left, and the error is one line naming the file."""
    place = small_disk or tmp_path
    state = {"model": {"w": torch.zeros(64)}}
    path = save_atomic(state, place / "last.pt")
    big = {"model": {"w": torch.zeros(2 * 1024 * 1024 // 4)}}  # 2 MiB: more than the disk holds
    if small_disk is None:
        fill_disk_with(monkeypatch, limit=1024 * 1024)
    with pytest.raises(DiskFullError) as error:
        save_atomic(big, path)
    message = str(error.value)
    assert "no space left" in message and str(path) in message and "\n" not in message
    assert leftovers(place) == []
    assert torch.equal(load(path)["model"]["w"], state["model"]["w"])


def test_unwritable_place_is_one_line(read_only) -> None:
    before = tree(read_only)
    with pytest.raises(OutputError, match="cannot write .*(read-only file system|permission denied)"):
        write_bytes(read_only / "a.json", b"x")
    with pytest.raises(OutputError, match="cannot write"):
        files.check_writable_file(read_only / "sub" / "a.json")
    assert tree(read_only) == before


def staged(out: Path, **options) -> StagedDirectory:
    directory = StagedDirectory(out, what="test output", ours=lambda p: (p / "ours").is_file(), **options)
    (directory.root / "ours").write_text("new")
    return directory


def test_staged_directory_lands_whole(tmp_path) -> None:
    assert staged(tmp_path / "out").commit() == tmp_path / "out"
    assert tree(tmp_path) == {"out": None, "out/ours": b"new"}


def test_an_empty_directory_counts_as_absent(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    staged(tmp_path / "out").commit()
    assert (tmp_path / "out/ours").read_text() == "new"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_foreign_directory_is_never_replaced(tmp_path, overwrite) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    # with or without --overwrite: not "pass --overwrite", which would be refused next
    with pytest.raises(OutputError, match="refusing to replace .* not a test output"):
        staged(tmp_path / "out", overwrite=overwrite)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_is_never_replaced(tmp_path, overwrite) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputError, match="is a file"):
        staged(tmp_path / "out", overwrite=overwrite)
    assert tree(tmp_path) == {"out": b"a file"}


def test_an_input_is_never_replaced(tmp_path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle/ours").write_text("old")
    (tmp_path / "bundle/model.pt").write_text("the input")
    before = tree(tmp_path)
    for out, given in (
        (tmp_path / "bundle", tmp_path / "bundle/model.pt"),
        (tmp_path / "x.pt", tmp_path / "x.pt"),
    ):
        with pytest.raises(OutputError, match="would replace the input"):
            staged(out, overwrite=True, inputs=[given])
    assert tree(tmp_path) == before


def test_overwrite_replaces_ours(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/ours").write_text("old")
    (tmp_path / "out/stale").write_text("old")
    staged(tmp_path / "out", overwrite=True).commit()
    assert tree(tmp_path) == {"out": None, "out/ours": b"new"}


def test_a_command_that_replaces_its_own_output_unasked_still_keeps_the_users(tmp_path) -> None:
    """infer and demo rerun into their earlier output without --overwrite; a folder of anything else stays,
    and the refusal does not point to an --overwrite they do not have."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out/ours").write_text("old")
    staged(tmp_path / "out", replaces_own=True).commit()
    assert tree(tmp_path) == {"out": None, "out/ours": b"new"}
    (tmp_path / "out/ours").unlink()
    (tmp_path / "out/thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="holds other files than an earlier test output") as refused:
        staged(tmp_path / "out", replaces_own=True)
    assert "--overwrite" not in str(refused.value)
    assert tree(tmp_path) == before


def test_an_error_on_another_file_is_not_blamed_on_the_output(tmp_path) -> None:
    """An OSError met on another path while the output is staged (inductor's cache folder being a file, say)
    keeps its own file name; one on the output names the output."""
    elsewhere = OSError(errno.EEXIST, "File exists", str(tmp_path / "cache"))
    with pytest.raises(OSError) as raised, staged(tmp_path / "out"):
        raise elsewhere
    assert raised.value is elsewhere and not (tmp_path / "out").exists()
    refused = pytest.raises(OutputError, match="cannot write .*out: permission denied")
    with refused, staged(tmp_path / "out") as directory:
        raise OSError(errno.EACCES, "Permission denied", str(directory.root / "mask.png"))


def test_a_name_that_fits_is_written_though_its_temporary_would_not(tmp_path) -> None:
    """The temporary beside a file is 14 bytes longer than its name: a 250-byte name that fits failed at the
    very end of the work that made it."""
    name = "q" * 238 + "_overlay.png"
    write_bytes(tmp_path / name, b"mask")
    assert (tmp_path / name).read_bytes() == b"mask" and len(list(tmp_path.iterdir())) == 1
    directory = StagedDirectory(tmp_path / ("d" * 250), what="test output", ours=lambda p: False)
    directory.commit()
    assert (tmp_path / ("d" * 250)).is_dir()


def test_a_file_name_too_long_to_write_is_one_line(tmp_path) -> None:
    with pytest.raises(OutputError, match="the name is too long"):
        files.check_writable_file(tmp_path / ("b" * 300 + ".json"))


def test_commit_into_replaces_the_named_entries_together_and_keeps_the_rest(tmp_path) -> None:
    (tmp_path / "out/train").mkdir(parents=True)
    (tmp_path / "out/train/last.pt").write_text("a training run")
    (tmp_path / "out/ours").write_text("old")
    (tmp_path / "out/chart").write_text("old, and this run draws none")
    directory = staged(tmp_path / "out", overwrite=True)
    (directory.root / "bundle").mkdir()
    (directory.root / "bundle/graph").write_text("new")
    assert directory.commit_into(["ours", "bundle", "chart"]) == tmp_path / "out"
    assert tree(tmp_path) == {
        "out": None,
        "out/ours": b"new",
        "out/bundle": None,
        "out/bundle/graph": b"new",
        "out/train": None,
        "out/train/last.pt": b"a training run",
    }


def test_commit_into_a_new_output_renames_it_whole(tmp_path) -> None:
    staged(tmp_path / "new").commit_into(["ours"])
    assert tree(tmp_path) == {"new": None, "new/ours": b"new"}


def test_commit_into_that_fails_partway_leaves_the_output_as_it_was(tmp_path, monkeypatch) -> None:
    (tmp_path / "out").mkdir()
    for name in ("ours", "other", "kept"):
        (tmp_path / "out" / name).write_text("old")
    before = tree(tmp_path)
    directory = staged(tmp_path / "out", overwrite=True)
    (directory.root / "other").write_text("new")
    renames = []
    real_rename = os.rename

    def third_fails(source, target):
        renames.append(target)
        if len(renames) == 3:  # both earlier entries moved aside, the first new one not yet in place
            raise OSError(errno.EIO, "Input/output error", str(target))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", third_fails)
    with pytest.raises(OutputError, match="Input/output error"):
        directory.commit_into(["ours", "other"])
    assert tree(tmp_path) == before


def test_second_of_two_runs_into_one_absent_output_fails(tmp_path) -> None:
    """Both checked at the start while the output was absent; the later commit must not replace it."""
    first, second = staged(tmp_path / "out"), staged(tmp_path / "out")
    (first.root / "ours").write_text("first")
    first.commit()
    with pytest.raises(OutputError, match="appeared while|already exists"):
        second.commit()
    assert tree(tmp_path) == {"out": None, "out/ours": b"first"}


def test_what_appeared_meanwhile_is_checked_again_with_overwrite(tmp_path) -> None:
    directory = staged(tmp_path / "out", overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/photo.jpg").write_text("not ours")
    with pytest.raises(OutputError, match="not a test output"):
        directory.commit()
    assert tree(tmp_path) == {"out": None, "out/photo.jpg": b"not ours"}


def test_rename_noreplace_refuses_an_existing_target(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b/x").write_text("kept")
    with pytest.raises(FileExistsError):
        files.rename_noreplace(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").write_text("file")
    with pytest.raises(FileExistsError):
        files.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "b/x").read_text() == "kept" and (tmp_path / "a").is_dir()


def test_holds_only_names_what_an_earlier_output_may_hold(tmp_path) -> None:
    """A named file, anything inside a named folder, and the folders on the way to a named file; nothing
    else (an added file, a folder of the user's next to ours)."""
    out = tmp_path / "out"
    (out / "bundle" / "deep").mkdir(parents=True)
    (out / "bundle" / "deep" / "x.onnx").write_text("ours")
    (out / "graphs").mkdir()
    (out / "graphs" / "a.onnx").write_text("ours")
    (out / "results.json").write_text("{}")
    names = ["results.json", "bundle", "graphs/a.onnx"]
    assert files.holds_only(out, names)
    assert files.holds_only(out, [*names, "absent.png"])  # a damaged earlier output: still ours
    (out / "graphs" / "notes.txt").write_text("the user's")
    assert not files.holds_only(out, names)
    (out / "graphs" / "notes.txt").unlink()
    (out / "mine").mkdir()  # an empty folder of the user's is theirs too
    assert not files.holds_only(out, names)
    (out / "mine").rmdir()
    for crafted in ("", ".", "./", "..", "bundle/../..", str(out), 5):  # a marker listing these: not ours
        assert not files.holds_only(out, [*names, crafted]), crafted


def test_an_output_inside_an_input_folder_is_refused(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "JPEGImages").mkdir(parents=True)
    with pytest.raises(OutputError, match="is inside the input"):
        files.check_not_input(data / "JPEGImages" / "chart.png", [data], "--chart")
    files.check_not_input(tmp_path / "chart.png", [data], "--chart")  # beside it: fine
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    files.check_not_input(tmp_path / "eval.json", [checkpoint], "--json")  # beside a file input: fine


def test_signals_wait_for_the_end_of_a_deferred_block() -> None:
    """A Ctrl-C during the two renames of a replacing commit is delivered after them, not between them."""
    import os
    import signal

    from crnet.files import signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the block went on")
    assert done == ["the block went on"]


@pytest.mark.parametrize("number", ["SIGINT", "SIGTERM"])
def test_a_signal_that_another_thread_takes_waits_too(number) -> None:
    """The kernel hands a process's signal to any thread that does not block it (tqdm's monitor, ONNX
    Runtime's pool); Python then runs the handler in the main thread, in the middle of the block. Seen:
    a demo's earlier results deleted by a SIGTERM between its renames."""
    import signal
    import threading
    import time

    from crnet.files import signals_deferred

    done = []
    previous = signal.signal(signal.SIGTERM, lambda n, frame: done.append("terminated"))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with signals_deferred():
            signal.pthread_kill(other.ident, getattr(signal, number))
            time.sleep(0.1)  # the main thread runs the handler at its next check: during this sleep
            done.append("the block went on")
    except KeyboardInterrupt:
        done.append("interrupted after the block")
    finally:
        stop.set()
        other.join()
        signal.signal(signal.SIGTERM, previous)
    after = "interrupted after the block" if number == "SIGINT" else "terminated"
    assert done == ["the block went on", after]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_the_umask_gives(umask, tmp_path) -> None:
    """mkstemp and mkdtemp make 0600 files and 0700 folders: every output was private to its owner."""
    previous = os.umask(umask)
    try:
        write_bytes(tmp_path / "results.json", b"{}")
        staged(tmp_path / "bundle").commit()
    finally:
        os.umask(previous)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o777 & ~umask


def test_json_nested_past_the_parsers_recursion_is_damaged_json(tmp_path) -> None:
    """Every reader of crnet's JSON files treats ValueError as damage or "not ours"; json.loads raises
    RecursionError on deep nesting, which once gave tracebacks (eval --json, the index cache, infer.json)."""
    from crnet.commands.bench import is_bench_json
    from crnet.commands.cli import is_eval_json
    from crnet.files import parse_json

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep)
    assert parse_json('{"a": [1]}') == {"a": [1]}
    (tmp_path / "deep.json").write_text(deep)
    assert not is_bench_json(tmp_path / "deep.json") and not is_eval_json(tmp_path / "deep.json")


def test_a_file_that_came_during_the_run_is_checked_at_the_rename(tmp_path) -> None:
    """eval and bench checked their --json and --chart at the start only: a user's file written there during
    the run was replaced in silence. The check runs again at the rename."""
    checked = []

    def only_ours(path: Path) -> None:
        checked.append(path)
        if path.read_bytes() != b"ours":
            raise OutputError(f"{path} is not ours")

    target = tmp_path / "results.json"
    with pytest.raises(OutputError, match="is not ours"), atomic_file(target, only_ours) as temporary:
        temporary.write_bytes(b"new")
        target.write_bytes(b"the user's notes")  # came while the command ran
    assert tree(tmp_path) == {"results.json": b"the user's notes"}  # kept, and no temporary left
    target.write_bytes(b"ours")  # an earlier output of the command: replaced
    write_bytes(target, b"new", only_ours)
    assert target.read_bytes() == b"new" and len(checked) == 2
    target.unlink()  # nothing there: written without a check
    write_bytes(target, b"new", only_ours)
    assert target.read_bytes() == b"new" and len(checked) == 2


def test_a_file_that_fails_inside_a_staged_folder_is_named_in_the_output(tmp_path) -> None:
    """infer on a full disk said "writing small/.o.partial-lxseeh50/b4_overlay.png", a folder that no
    longer existed; the user asked for small/o."""
    stage = staged(tmp_path / "o")
    with pytest.raises(DiskFullError) as caught, stage, atomic_file(stage.root / "x.png") as temporary:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))
    assert str(caught.value).startswith(f"no space left on the device writing {tmp_path / 'o' / 'x.png'};")
    assert tree(tmp_path) == {}
