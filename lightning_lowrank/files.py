"""Crash-safe writes: a file, or a set of files in one directory, replaced all at once.

Every file the library writes (adapter files, PEFT adapter directories) goes through here, so they
all follow one rule: the new content is written to a temporary name next to the target, flushed to
disk (``fsync``), given the permissions a plain ``open()`` would give (``0o666`` minus the umask,
not ``mkstemp``'s ``0o600``), and only then renamed over the target. A crash at any point leaves
either the old content or the new, never a mix.

A directory of several files (PEFT's ``adapter_config.json`` next to ``adapter_model.safetensors``)
is updated by building the complete new directory beside the old one and exchanging the two in one
``renameat2(RENAME_EXCHANGE)`` call where the platform has it (Linux); elsewhere the old directory
is renamed aside first, so a crash in between leaves no directory rather than new weights under an
old config.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Writer = Callable[[str], Any]


def _umask_mode(mode: int = 0o666) -> int:
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories: the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(tmp: str, write: Writer, mode: int) -> None:
    write(tmp)
    os.chmod(tmp, mode)
    _fsync_path(tmp)


def atomic_write(path: str | os.PathLike, write: Writer) -> Path:
    """Write a file through ``write(tmp_path)`` and rename it over ``path`` once it is on disk.

    Args:
        path: the file to create or replace.
        write: writes the complete content to the temporary path it is given.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_durable(tmp, write, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def replace_directory_files(directory: str | os.PathLike, files: Mapping[str, Writer]) -> Path:
    """Replace several files of ``directory`` at once: readers see all old files or all new ones.

    Other entries of an existing directory are carried over (hard links where possible).

    Args:
        directory: the directory to create or update.
        files: file name -> writer (called with the temporary path to write).

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent)
    )
    try:
        os.chmod(staging, _umask_mode(0o777))
        mode = _umask_mode()
        for name, write in files.items():
            _write_durable(str(staging / name), write, mode)
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name in files:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, staging / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(entry), str(staging / entry.name))
            shutil.copystat(directory, staging)
        _fsync_path(staging, directory=True)
        if not directory.exists():
            os.rename(staging, directory)
        elif _exchange(staging, directory):
            shutil.rmtree(staging)  # now the old content
        else:
            old = Path(
                tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent)
            )
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_path(directory.parent, directory=True)
    return directory
