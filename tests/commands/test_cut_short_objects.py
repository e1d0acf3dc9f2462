"""benchmarks/cut_short_objects.py: a shared object that a killed compile left truncated in inductor's cache
is found and removed (the loader refused it: "file too short"), a whole one is kept."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands.test_unreached_tests import benchmark_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "cut_short_objects.py"


@pytest.fixture
def script():
    return benchmark_script(SCRIPT)


@pytest.fixture
def library(tmp_path) -> Path:
    """A small real shared object (the interpreter's own ctypes extension)."""
    import _ctypes

    source = Path(_ctypes.__file__)
    if source.suffix != ".so":
        pytest.skip(f"no shared object to copy here: {source}")
    return Path(shutil.copy(source, tmp_path / "whole.so"))


def loads(path: Path) -> bool:
    try:
        ctypes.CDLL(str(path))
    except OSError:
        return False
    return True


def test_a_truncated_object_is_cut_short_and_a_whole_one_is_not(script, library, tmp_path) -> None:
    data = library.read_bytes()
    assert loads(library) and not script.cut_short(library)
    for size in (0, 40, 200, len(data) // 2, len(data) - 1):
        cut = tmp_path / "cache" / f"x{size}" / "main.so"
        cut.parent.mkdir(parents=True)
        cut.write_bytes(data[:size])
        assert script.cut_short(cut), size
        # the loader's own verdict where it reads past the end in its headers (cut later, it maps the
        # segments as they are, and a read past the end faults once the library runs)
        if size <= 200:
            assert not loads(cut), size
    (tmp_path / "cache" / "kept.so").write_bytes(data)
    (tmp_path / "cache" / "source.cpp").write_text("not an object")  # only .so files are looked at
    removed = script.remove_cut_short(tmp_path / "cache")
    assert len(removed) == 5 and not any(path.exists() for path in removed)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_file()) == ["kept.so", "source.cpp"]
    assert script.remove_cut_short(tmp_path / "nowhere") == []


def test_the_script_names_what_it_removed(library, tmp_path) -> None:
    (tmp_path / "a.so").write_bytes(library.read_bytes()[:100])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        f"1 cut-short shared objects removed from {tmp_path}",
        f"  {tmp_path / 'a.so'}",
    ]


def test_the_cache_folder_is_inductors(script, monkeypatch, tmp_path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert script.cache_folder() == Path(default_cache_dir())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert script.cache_folder() == tmp_path
