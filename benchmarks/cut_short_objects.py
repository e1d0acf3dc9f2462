"""Remove the shared objects in inductor's on-disk cache that a killed compile left cut short.

    python benchmarks/cut_short_objects.py [FOLDER]     # default: inductor's cache folder

Inductor compiles its C++ wrappers with a lock around each build, and takes an existing file for a finished
one. A process killed while its compiler writes (a suite stopped with SIGKILL at its deadline, as the
eighth GPU run's was, 2026-11-27) leaves a truncated `.so` there, and every later process that compiles
the same graph fails to load it ("file too short": the rerun's anchor test). Removed, it is built again.
A file is cut short when it is not ELF, or when its program headers, its segments or its section headers
end past the end of the file (the linker writes the section headers last, at the end).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path


def cache_folder() -> Path:
    """Inductor's cache folder as torch works it out, without importing torch."""
    if folder := os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(folder)
    import getpass
    import tempfile

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


def cut_short(path: Path) -> bool:
    """Whether the 64-bit little-endian ELF file `path` ends before its own headers say it does (a file of
    another ELF class is taken as whole)."""
    data = path.read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return True
    if data[4:6] != b"\x02\x01":  # not ELF64 little-endian: not inductor's output on x86-64 or aarch64
        return False
    program, sections = struct.unpack_from("<QQ", data, 0x20)
    program_size, program_count, section_size, section_count = struct.unpack_from("<HHHH", data, 0x36)
    ends = [program + program_size * program_count, sections + section_size * section_count]
    if ends[0] <= len(data):
        for i in range(program_count):
            offset, _, _, size = struct.unpack_from("<QQQQ", data, program + i * program_size + 8)
            ends.append(offset + size)
    return max(ends) > len(data)


def remove_cut_short(folder: Path) -> list[Path]:
    """Remove every cut-short `.so` under `folder`; the paths removed."""
    removed = []
    for path in sorted(folder.rglob("*.so")) if folder.is_dir() else []:
        try:
            if path.is_file() and cut_short(path):
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to remove: a later load says so itself
            continue
    return removed


def main() -> int:
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_folder()
    removed = remove_cut_short(folder)
    print(f"{len(removed)} cut-short shared objects removed from {folder}", *removed, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
