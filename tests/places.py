"""Places that fail writes, for the tests of what a command does when it cannot write.

A small or read-only file system is a real tmpfs where the test may mount one (root on Linux); elsewhere a
full disk is simulated (writes raise ENOSPC) and a read-only place is a directory without write permission,
which only a user other than root cannot write into.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


def mount_tmpfs(path: Path, *, size: str, read_only: bool = False) -> bool:
    """Mount a tmpfs of `size` on the existing directory `path`; False where that is not allowed."""
    options = f"{'ro,' if read_only else ''}size={size}"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def read_only_place(path: Path) -> Path | None:
    """A new directory at `path` nothing can be written into, or None where none can be made (root
    without mount)."""
    path.mkdir()
    if mount_tmpfs(path, size="64k", read_only=True):
        return path
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    return None


def release(path: Path | None) -> None:
    """Undo `read_only_place` (or a mount): unmount and give write permission back."""
    if path is not None:
        unmount(path)
        path.chmod(0o755)


def fill_disk_with(monkeypatch, limit: int) -> None:
    """Where no small file system can be mounted: writes of more than `limit` bytes (Path.write_bytes, as
    crnet.files writes) fail with ENOSPC after writing `limit` bytes."""
    real = Path.write_bytes

    def write_bytes_until_full(self, data):
        if len(data) > limit:
            real(self, bytes(data)[:limit])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes_until_full)


def leftovers(root: Path) -> list[str]:
    """Temporaries of crnet.files (and staged directories) under root."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or ".partial-" in p.name or ".old-" in p.name
    )


def make_read_only(path: Path) -> bool:
    """Make an existing directory read-only for everyone, root included: a read-only bind mount of itself
    where mounting is allowed, else (not root) its write permission removed. False where neither works."""
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if bound:
        remounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True)
        if remounted.returncode == 0:
            return True
        unmount(path)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return False
