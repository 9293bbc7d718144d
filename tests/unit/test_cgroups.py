"""cgroups: the v2 (unified) code path against a fake cgroupfs tree, the v1 path against the host's tree.

This host mounts cgroup v1, so the v2 path cannot run for real here. The fake tree answers the few
kernel behaviours the code depends on (``+controller`` writes to ``cgroup.subtree_control`` adding to
the file, "no internal processes" refusing them with EBUSY while the parent holds processes,
``cgroup.procs`` moving a process); everything else is plain files, which is what cgroupfs is to a
writer. The v1 tests use the real hierarchy when this process may manage one.
"""

import errno
import os
from pathlib import Path

import pytest

from nimbus.machines import cgroups
from nimbus.machines.bwrap import enforcement


class FakeCgroupfs:
    """A cgroup v2 tree in a directory; ``write`` stands in for ``cgroups._write`` with cgroupfs semantics."""

    def __init__(self, root: Path, own: str, controllers=("cpu", "memory", "pids", "io"), procs=()) -> None:
        self.root = root
        self.own = root / own.lstrip("/")
        self.own.mkdir(parents=True)
        (self.own / "cgroup.controllers").write_text(" ".join(controllers) + "\n")
        (self.own / "cgroup.subtree_control").write_text("")
        (self.own / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
        self.writes: list[tuple[Path, str]] = []

    def mounts(self):
        return [cgroups._Mount(2, self.root, "/", frozenset())]

    def available(self, directory: Path) -> list[str]:
        """A cgroup's controllers: what its parent enabled for its children (the node's own: as given)."""
        if directory == self.own:
            return (directory / "cgroup.controllers").read_text().split()
        return (directory.parent / "cgroup.subtree_control").read_text().split()

    def write(self, path: Path, value: str) -> None:
        path = Path(path)
        self.writes.append((path, value))
        directory = path.parent
        if path.name == "cgroup.subtree_control":
            name = value.lstrip("+")
            if name not in self.available(directory):
                raise OSError(errno.ENOENT, "controller not available")
            if (directory / "cgroup.procs").read_text().strip():
                raise OSError(errno.EBUSY, "no internal processes")
            have = path.read_text().split()
            path.write_text(" ".join(sorted({*have, name})) + "\n")
        elif path.name == "cgroup.procs":
            pid = str(os.getpid()) if value == "0" else value
            for procs in self.root.rglob("cgroup.procs"):
                left = [p for p in procs.read_text().split() if p != pid]
                procs.write_text("".join(f"{p}\n" for p in left))
            path.write_text(path.read_text() + pid + "\n")
        else:
            path.write_text(value)


@pytest.fixture
def fake_v2(tmp_path, monkeypatch):
    """A pure v2 host where this process sits alone in ``/user.slice/node.scope``."""
    fs = FakeCgroupfs(tmp_path / "cgroup", "/user.slice/node.scope", procs=[os.getpid()])

    def mkdir_with_files(self, *args, **kwargs):
        """cgroupfs fills every new directory with its interface files."""
        real_mkdir(self, *args, **kwargs)
        if self.is_relative_to(fs.root) and not (self / "cgroup.procs").exists():
            (self / "cgroup.subtree_control").write_text("")
            (self / "cgroup.procs").write_text("")

    real_mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    monkeypatch.setattr(cgroups, "_read_mounts", fs.mounts)
    monkeypatch.setattr(cgroups, "_read_own_cgroups", lambda: ("/user.slice/node.scope", {}))
    monkeypatch.setattr(cgroups, "_write", fs.write)
    return fs


def test_v2_detect_moves_the_node_into_a_leaf_and_enables_controllers(fake_v2):
    hierarchy = cgroups.Hierarchy.detect()
    own = fake_v2.own
    assert hierarchy.version == 2
    assert hierarchy.controllers == frozenset({"cpu", "memory", "pids"})  # io is not wanted
    assert [b.path for b in hierarchy.bases] == [own / cgroups.BASE_NAME]
    # The node left its cgroup for the leaf, so the cgroup could hand controllers down.
    assert str(os.getpid()) in (own / cgroups.NODE_LEAF / "cgroup.procs").read_text().split()
    assert set((own / "cgroup.subtree_control").read_text().split()) == {"cpu", "memory", "pids"}
    assert set((own / cgroups.BASE_NAME / "cgroup.subtree_control").read_text().split()) == {"cpu", "memory", "pids"}


def test_v2_limits_are_written_as_the_unified_files(fake_v2):
    hierarchy = cgroups.Hierarchy.detect()
    cg = hierarchy.create("m1", cgroups.Limits(memory_bytes=64 << 20, pids_max=42, cpus=0.5))
    d = fake_v2.own / cgroups.BASE_NAME / "m1"
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "42"
    assert (d / "cpu.max").read_text() == f"50000 {cgroups.CPU_PERIOD_US}"
    assert cg.controllers == frozenset({"cpu", "memory", "pids"})
    assert f"echo 0 >{d / 'cgroup.procs'}" in cg.shell_join()
    # cgroup.kill kills the whole subtree in one write, forks included
    cg.kill()
    assert (d / "cgroup.kill", "1") in fake_v2.writes
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert cg.oom_kills() == 2


def test_v2_refuses_a_cgroup_shared_with_other_processes(tmp_path, monkeypatch):
    fs = FakeCgroupfs(tmp_path / "cgroup", "/shared", procs=[os.getpid(), 1])
    monkeypatch.setattr(cgroups, "_read_mounts", fs.mounts)
    monkeypatch.setattr(cgroups, "_read_own_cgroups", lambda: ("/shared", {}))
    monkeypatch.setattr(cgroups, "_write", fs.write)
    with pytest.raises(cgroups.CgroupUnavailable, match="also holds processes"):
        cgroups.Hierarchy.detect()


def test_v2_without_delegated_controllers_is_unavailable(tmp_path, monkeypatch):
    fs = FakeCgroupfs(tmp_path / "cgroup", "/empty", controllers=("io",))
    monkeypatch.setattr(cgroups, "_read_mounts", fs.mounts)
    monkeypatch.setattr(cgroups, "_read_own_cgroups", lambda: ("/empty", {}))
    monkeypatch.setattr(cgroups, "_write", fs.write)
    with pytest.raises(cgroups.CgroupUnavailable, match="delegated"):
        cgroups.Hierarchy.detect()


def test_a_read_only_tree_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "_read_mounts", lambda: [])
    monkeypatch.setattr(cgroups, "_read_own_cgroups", lambda: ("/", {}))
    with pytest.raises(cgroups.CgroupUnavailable):
        cgroups.Hierarchy.detect()


def test_enforcement_names_each_mechanism():
    """What ``nimbus doctor`` and the driver say for each host kind."""
    full = enforcement(frozenset({"memory", "pids", "cpu"}), 2, privileged=False, seccomp_on=True)
    assert full == {"memory": "cgroup v2 memory", "pids": "cgroup v2 pids", "cpu": "cgroup v2 cpu quota",
                    "syscalls": "seccomp filter"}
    bare = enforcement(frozenset(), 1, privileged=False, seccomp_on=False)
    assert bare["memory"] == "RLIMIT_DATA per process" and bare["pids"].startswith("RLIMIT_NPROC")
    assert bare["cpu"] == "none" and bare["syscalls"] == "none"
    # A root node gives each machine a uid of its own, so RLIMIT_NPROC counts one machine there too.
    assert enforcement(frozenset(), 1, privileged=True, seccomp_on=True)["pids"].startswith("RLIMIT_NPROC")


def _v1_usable() -> str | None:
    try:
        hierarchy = cgroups.Hierarchy.detect()
    except cgroups.CgroupUnavailable as exc:
        return str(exc)
    try:
        return None if hierarchy.version == 1 else "this host's controllers are on cgroup v2"
    finally:
        hierarchy.close()


@pytest.mark.skipif(_v1_usable() is not None, reason=f"no writable cgroup v1 tree: {_v1_usable()}")
def test_v1_limits_on_the_real_tree_and_kill():
    import subprocess
    import time

    hierarchy = cgroups.Hierarchy.detect()
    name = f"unit-{os.getpid()}"
    cg = hierarchy.create(name, cgroups.Limits(memory_bytes=48 << 20, pids_max=7, cpus=0.25))
    try:
        for part in cg.parts:
            assert part.version == 1
            if "memory" in part.controllers:
                assert (part.path / "memory.limit_in_bytes").read_text().strip() == str(48 << 20)
            if "pids" in part.controllers:
                assert (part.path / "pids.max").read_text().strip() == "7"
            if "cpu" in part.controllers:
                assert (part.path / "cpu.cfs_quota_us").read_text().strip() == "25000"
        proc = subprocess.Popen(["/bin/sh", "-c", cg.shell_join() + "exec sleep 60"])
        deadline = time.monotonic() + 5
        while proc.pid not in cg.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.pid in cg.pids()
        cg.kill()
        assert proc.wait(5) == -9
    finally:
        cg.kill()
        for _ in range(100):
            if cg.remove():
                break
            time.sleep(0.02)
        hierarchy.close()
    assert not any(part.path.exists() for part in cg.parts)
