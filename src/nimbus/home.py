"""The node's home directory: private to the user the node runs as.

The home holds the SQLite database (function environments, results, API key hashes), build artifacts,
layers and the machines' staging files. Any local account that can read it learns what tenants keep
there, so the home is made ``0700`` and the database files ``0600``. One private directory is the
boundary: files inside it keep the modes their consumers need (machines read layers and the agent's
files through bind mounts that the node sets up, not by walking the home).

:func:`exposure` is what ``nimbus doctor`` reports; :func:`prepare` is what a starting node does.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("nimbus.home")

HOME_MODE = 0o700
FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def prepare(home: Path) -> Path:
    """Create ``home`` private, or make an existing one private (saying so), and return its resolved path."""
    home = home.expanduser().resolve()
    home.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        os.chmod(home, HOME_MODE)
        log.warning("the node's home %s was mode %o (others could read it); it is now %o", home, mode, HOME_MODE)
    return home


def private_file(path: Path) -> None:
    """Make sure ``path`` exists and only its owner may read or write it (an SQLite file before it is opened).

    SQLite gives its WAL, shared-memory and journal files the main file's mode, so this covers them too;
    those already on disk from an older node are tightened as well.
    """
    path.parent.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE))
    for suffix in SQLITE_SUFFIXES:
        sibling = path.with_name(path.name + suffix)
        try:
            if stat.S_IMODE(sibling.stat().st_mode) & 0o077:
                os.chmod(sibling, FILE_MODE)
        except FileNotFoundError:
            pass


def exposure(home: Path, database: Path | None = None) -> list[str]:
    """What in ``home`` (and the SQLite ``database``, wherever it is) other local accounts may read."""
    found = []
    try:
        mode = stat.S_IMODE(home.stat().st_mode)
    except FileNotFoundError:
        return []
    if mode & 0o077:
        found.append(f"{home} is mode {mode:o} (should be {HOME_MODE:o})")
    if database is not None:
        for suffix in SQLITE_SUFFIXES:
            path = database.with_name(database.name + suffix)
            try:
                file_mode = stat.S_IMODE(path.stat().st_mode)
            except FileNotFoundError:
                continue
            if file_mode & 0o077:
                found.append(f"{path} is mode {file_mode:o} (should be {FILE_MODE:o})")
    return found


__all__ = ["exposure", "prepare", "private_file"]
