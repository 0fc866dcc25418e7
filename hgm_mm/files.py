"""Writing files so that a crash or a kill never leaves one half-written, and reading the manifests of saved folders."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from .version import __version__


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


def atomic_json(path: Path, document: Any) -> None:
    """`document` as indented JSON, written atomically (values JSON does not know become strings)."""
    atomic_text(path, json.dumps(document, indent=2, default=str))


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


def read_json_object(path: Path, *, fix: str) -> dict[str, Any]:
    """A JSON file that must hold one object.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: it is not JSON, or not an object; the message ends with `fix`.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}")
    return data


def read_versioned_manifest(path: Path, *, reads_up_to: int, fix: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON manifest of a saved folder (model, index, catalogue, embedding shards), checked
    before anything else in the folder is read: a JSON object with `required` keys and a
    `format_version` this hgm_mm reads.

    Args:
        path: the manifest file.
        reads_up_to: the newest `format_version` this hgm_mm reads for the folder.
        fix: what to do about a damaged manifest ("save the index again"), ending each message.
        required: keys the manifest holds besides `format_version`.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: not JSON, not an object, keys missing, an invalid `format_version`, or a newer
            one (naming the hgm_mm that wrote it, and saying to upgrade).
    """
    manifest = read_json_object(path, fix=fix)
    missing = [key for key in ("format_version", *required) if key not in manifest]
    if missing:
        raise ValueError(f"{path}: key(s) {missing} are missing; {fix}")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version={version!r} is not valid; {fix}")
    if version > reads_up_to:
        raise ValueError(f"{path}: format_version={version}, saved by hgm_mm {manifest.get('library_version', '?')}; "
                         f"this hgm_mm {__version__} reads formats up to {reads_up_to}. Upgrade: pip install -U hgm-mm")
    return manifest
