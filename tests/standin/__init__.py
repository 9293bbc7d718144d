"""TEST STAND-INS for Firecracker and its jailer: none of this is Firecracker, and none of it is used by ``make run``.

No firecracker or jailer binary and no bootable KVM exist where Nimbus is developed, so the pieces that
talk to them are tested against stand-ins that follow Firecracker's own documents (the API schema
``firecracker.yaml``, ``vsock.md``, ``jailer.md``, ``snapshot-support.md``, read where
``tests/firecracker_spec.py`` finds them):

* :mod:`standin.schema` — the API schema loaded, each request body checked against its definition;
* :mod:`standin.wire` — HTTP/1.1 requests and responses (faults are ``{"fault_message": …}``);
* :mod:`standin.muxer` — the host side of the vsock device: ``CONNECT <port>\\n``, ``OK <port>\\n``, bridging;
* :mod:`standin.agent` — the real guest agent started as a host process, over a socketpair (``--fd``) or
  listening on a Unix socket in place of its vsock port (``--vsock-port``);
* :mod:`standin.frames` — the guest protocol frames the tests send (ping, init, exec);
* ``firecracker.py`` and ``jailer.py`` — stand-in EXECUTABLES; each module's docstring says exactly what
  it does and does not do.

Tests launch the executables through :func:`install`, which writes small wrapper scripts bound to the
running interpreter and to this checkout (absolute paths), so they work from a clone anywhere and after
the jailer stand-in copies the Firecracker one into a jail::

    fc = standin.install(tmp_dir)
    subprocess.Popen([fc.firecracker, "--api-sock", "api.sock"], cwd=...)
    JailSpec(..., exec_file=fc.firecracker, jailer=fc.jailer)
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]

_WRAPPER = """#!{python}
# A TEST STAND-IN for {what}, written by tests/standin/__init__.py install(): NOT {what}.
import sys
sys.path[:0] = [{tests!r}]
from standin.{module} import main
sys.exit(main(sys.argv[1:]{extra}))
"""


@dataclass(frozen=True)
class Installed:
    """Where :func:`install` put the stand-in executables."""

    firecracker: Path
    jailer: Path


def install(directory: str | os.PathLike, *, spec_dir: str | os.PathLike | None = None) -> Installed:
    """Write executable ``firecracker`` and ``jailer`` stand-in wrappers into ``directory/bin``.

    Each is a script whose shebang is this interpreter (``sys.executable``) and which imports the stand-in
    from this checkout's ``tests/`` by absolute path, so a copy of it runs anywhere (the jailer stand-in
    copies the exec file into the jail, as the jailer does) and in the empty environment the jailer
    leaves. ``spec_dir`` (where ``firecracker.yaml`` is; by default where ``firecracker_spec`` finds it
    now) is written into the Firecracker wrapper for the same reason. The names are the real ones
    (``firecracker``, ``jailer``): the jail's layout is ``<base>/<exec file name>/<id>/root``.
    """
    if spec_dir is None:
        sys.path.insert(0, str(TESTS_DIR))
        try:
            import firecracker_spec
        finally:
            sys.path.remove(str(TESTS_DIR))
        spec_dir = firecracker_spec.spec_dir()
    bin_dir = Path(directory) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, what, extra in (("firecracker", "Firecracker", f", spec_dir={str(Path(spec_dir).resolve())!r}"),
                              ("jailer", "Firecracker's jailer", "")):
        path = bin_dir / name
        path.write_text(_WRAPPER.format(python=sys.executable, what=what, tests=str(TESTS_DIR), module=name,
                                        extra=extra))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        paths[name] = path
    return Installed(**paths)
