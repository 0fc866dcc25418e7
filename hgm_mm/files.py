"""Writing files so that a crash or a kill never leaves one half-written."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp)` on a temporary file beside `path`, then moves it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_dir(path: Path, write: Callable[[Path], object]) -> None:
    """Calls `write(tmp_dir)` on a temporary folder beside `path`, then swaps it in for `path`."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(f".{path.name}.old")
    try:
        write(tmp)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks: what a manifest records to tie a file to it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_file_digest(path: Path, expected: str | None, fix: str) -> None:
    """Refuses a file whose SHA-256 differs from the one its manifest recorded (None: none recorded)."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"{path}: its content (sha256 {actual[:12]}...) is not the file its manifest recorded "
                         f"(sha256 {expected[:12]}...): it was replaced or changed since it was saved, perhaps by "
                         f"a file of another model or index. {fix}")
