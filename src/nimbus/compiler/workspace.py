"""A build's directories on the host: ``<home>/builds/<id>/src`` and ``…/out``, the only ones it may write.

The builder binds them at ``/build/src`` and ``/build/out``. What the build leaves behind is untrusted:
the artifact is opened without following symlinks (a build could plant ``out/bootstrap ->
/root/secret`` for the node to read) and must be a regular file of bounded size; the whole tree is
removed afterwards with :func:`shutil.rmtree`, which does not follow symlinks either.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

from nimbus.compiler.base import BuildFailed, Job

log = logging.getLogger("nimbus.compiler")

# As an uploaded artifact (docs/architecture.md#http-api); it must also fit a 64 MiB guest frame.
ARTIFACT_MAX = 50 << 20


def private_dir(path: Path) -> Path:
    """``path`` made (with parents) and set to 0700: no other host user may look into build state."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Workspace:
    """Make the job's directories (owned by ``owner`` when given: the uid/gid the build runs as), then clean up."""

    def __init__(self, root: Path, job: Job, *, owner: tuple[int, int] | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.root = Path(root)
        self.dir = self.root / self.id
        self.src = self.dir / "src"
        self.out = self.dir / "out"
        self.job = job
        self.owner = owner

    def __enter__(self) -> Workspace:
        private_dir(self.root)
        self.dir.mkdir(mode=0o700)
        try:
            for path in (self.src, self.out):
                # 0755: as root, bwrap enters them without CAP_DAC_OVERRIDE; the 0700 parents keep host users out.
                path.mkdir()
                os.chmod(path, 0o755)
                self._own(path)
            for name, data in self.job.files:
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"a job file must be a plain name, not {name!r}")
                target = self.src / name
                target.write_bytes(data)
                os.chmod(target, 0o644)
                self._own(target)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _own(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, *self.owner, follow_symlinks=False)

    def read_artifact(self, name: str, limit: int = ARTIFACT_MAX) -> bytes | None:
        """The artifact's bytes; None when there is no such regular file. ``BuildFailed`` when it is too large."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us
        try:
            fd = os.open(self.out / name, flags)
        except OSError:  # missing, or a symlink (ELOOP)
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_size > limit:
                raise BuildFailed(f"the build's artifact is {st.st_size} bytes; the limit is {limit}")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise BuildFailed(f"the build's artifact is over {limit} bytes")
        return data

    def remove(self) -> None:
        remove_tree(self.dir)


def remove_tree(path: Path) -> None:
    """Delete ``path`` whatever the build did to its modes (a 0500 directory cannot be emptied as is)."""

    def retry(func, failed, _exc) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)  # a directory it could not list: open it up and start it again
                remove_tree(Path(failed))
            else:
                func(failed)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", failed, exc)

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


__all__ = ["ARTIFACT_MAX", "Workspace", "private_dir", "remove_tree"]
