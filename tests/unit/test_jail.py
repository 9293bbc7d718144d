"""The jailer's command line against the rules of Firecracker's ``jailer.md``, and staging files into a jail.

No jailer binary exists on this host, so the contract is the document: the flags ``jailer_argv`` emits are
checked against the usage block parsed from ``jailer.md`` (read from ``$NIMBUS_FIRECRACKER_SPEC_DIR``,
default ``../shared/firecracker`` beside the repository, never copied here), and the rest against its
rules as written down in these tests. Staging runs for real in ``tmp_path``; the ownership checks need root.
"""

import errno
import logging
import os
import re
from pathlib import Path

import pytest

import firecracker_spec
from nimbus.errors import MachineStartError
from nimbus.machines.firecracker import jail

SPEC_DIR = firecracker_spec.spec_dir()
JAILER_MD = SPEC_DIR / "jailer.md"

pytestmark = pytest.mark.firecracker

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")

UUID_ID = "551e7604-e35c-42b3-b825-416853441234"
MIB = 1024 * 1024


def make_spec(**overrides) -> jail.JailSpec:
    values = dict(id=UUID_ID, memory_mb=128, vcpus=2, uid=123, gid=100,
                  exec_file=Path("/usr/bin/firecracker"), jailer=Path("/usr/bin/jailer"),
                  chroot_base_dir=Path("/srv/jailer"))
    values.update(overrides)
    return jail.JailSpec(**values)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The jailer's own arguments (without argv[0]) and those after ``--`` for Firecracker."""
    assert argv.count("--") == 1
    sep = argv.index("--")
    return argv[1:sep], argv[sep + 1:]


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


# --- the argv ---------------------------------------------------------------------------------------

def test_argv_has_each_required_flag_once_with_its_value():
    spec = make_spec()
    argv = jail.jailer_argv(spec)
    assert argv[0] == "/usr/bin/jailer"
    own, _ = split_argv(argv)
    expected = {"--id": UUID_ID, "--exec-file": "/usr/bin/firecracker", "--uid": "123", "--gid": "100",
                "--chroot-base-dir": "/srv/jailer", "--cgroup-version": "2"}
    for flag, value in expected.items():
        assert flag_values(own, flag) == [value], flag
    # every argument is a flag, a flag's value, or a lone switch: nothing is left over
    switches = {"--new-pid-ns", "--daemonize"}
    i = 0
    while i < len(own):
        assert own[i].startswith("--"), own[i]
        i += 1 if own[i] in switches else 2


def test_firecracker_args_follow_the_separator():
    spec = make_spec(firecracker_args=("--level", "Warning"))
    _, fc = split_argv(jail.jailer_argv(spec))
    assert fc == ["--api-sock", "/run/firecracker.socket", "--level", "Warning"]


@pytest.mark.parametrize("arg", ["--id", "--id=x", "--api-sock"])
def test_firecracker_args_may_not_repeat_what_the_jailer_or_api_sock_sets(arg):
    with pytest.raises(ValueError, match="firecracker_args"):
        make_spec(firecracker_args=(arg, "x"))


def test_switches_and_resource_limits():
    own, _ = split_argv(jail.jailer_argv(make_spec()))
    assert own.count("--new-pid-ns") == 1
    assert "--daemonize" not in own
    assert flag_values(own, "--resource-limit") == ["no-file=2048"]

    own, _ = split_argv(jail.jailer_argv(make_spec(
        daemonize=True, new_pid_ns=False, resource_limits=(("fsize", 250_000_000), ("no-file", 1024)))))
    assert own.count("--daemonize") == 1
    assert "--new-pid-ns" not in own
    assert flag_values(own, "--resource-limit") == ["fsize=250000000", "no-file=1024"]


@pytest.mark.parametrize("limits", [(("nproc", 10),), (("no-file", -1),), (("fsize", 1), ("fsize", 2))])
def test_resource_limits_are_the_documented_ones(limits):
    with pytest.raises(ValueError):
        make_spec(resource_limits=limits)


def test_netns_only_when_given():
    own, _ = split_argv(jail.jailer_argv(make_spec()))
    assert "--netns" not in own
    own, _ = split_argv(jail.jailer_argv(make_spec(netns=Path("/var/run/netns/my_netns"))))
    assert flag_values(own, "--netns") == ["/var/run/netns/my_netns"]
    with pytest.raises(ValueError):
        make_spec(netns=Path("relative/netns"))


def test_parent_cgroup_only_when_given():
    own, _ = split_argv(jail.jailer_argv(make_spec()))
    assert "--parent-cgroup" not in own
    own, _ = split_argv(jail.jailer_argv(make_spec(parent_cgroup="all_uvms/nimbus")))
    assert flag_values(own, "--parent-cgroup") == ["all_uvms/nimbus"]
    for bad in ("/abs", "../up", ""):
        with pytest.raises(ValueError):
            make_spec(parent_cgroup=bad)


# --- cgroups ----------------------------------------------------------------------------------------

def test_cgroup_v2_limits():
    own, _ = split_argv(jail.jailer_argv(make_spec(cgroup_version=2, memory_mb=128, vcpus=2)))
    assert flag_values(own, "--cgroup-version") == ["2"]
    cgroups = flag_values(own, "--cgroup")
    assert cgroups == [f"memory.max={128 * MIB}", f"cpu.max={2 * jail.CPU_PERIOD_US} {jail.CPU_PERIOD_US}"]
    assert f"memory.max={134217728}" in cgroups


def test_cgroup_v1_limits():
    own, _ = split_argv(jail.jailer_argv(make_spec(cgroup_version=1, memory_mb=128, vcpus=2)))
    assert flag_values(own, "--cgroup-version") == ["1"]
    settings = dict(c.split("=", 1) for c in flag_values(own, "--cgroup"))
    assert settings == {"memory.limit_in_bytes": "134217728",
                        "cpu.cfs_period_us": str(jail.CPU_PERIOD_US),
                        "cpu.cfs_quota_us": str(2 * jail.CPU_PERIOD_US)}


def test_every_cgroup_argument_has_the_documented_form():
    # jailer.md: `<cgroup_file>=<value>`, the file named <controller>.<setting>
    for version in (1, 2):
        for setting in make_spec(cgroup_version=version).cgroups():
            assert re.fullmatch(r"[a-z_]+\.[a-z_.]+=[^=]+", setting), setting


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_cgroup_version_is_1_or_2(version):
    with pytest.raises(ValueError, match="cgroup_version"):
        make_spec(cgroup_version=version)


@pytest.mark.parametrize("field,value", [("memory_mb", 0), ("vcpus", 0), ("vcpus", 1.5), ("memory_mb", "128")])
def test_limits_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=field):
        make_spec(**{field: value})


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("good", [UUID_ID, "a", "vm-1", "ABC-def-123", "-", "x" * jail.ID_MAX_LEN])
def test_good_ids(good):
    assert make_spec(id=good).id == good


@pytest.mark.parametrize("bad", ["", "vm_1", "vm.1", "vm/1", "../x", "vm 1", "vm\n", "vmé", "x" * (jail.ID_MAX_LEN + 1)])
def test_bad_ids(bad):
    with pytest.raises(ValueError, match="id"):
        make_spec(id=bad)


@pytest.mark.parametrize("field", ["uid", "gid"])
@pytest.mark.parametrize("value", [-1, "123", 1.0, True, None])
def test_uid_gid_must_be_non_negative_ints(field, value):
    with pytest.raises(ValueError, match=field):
        make_spec(**{field: value})


def test_uid_gid_zero_is_allowed():
    spec = make_spec(uid=0, gid=0)
    own, _ = split_argv(jail.jailer_argv(spec))
    assert flag_values(own, "--uid") == ["0"] and flag_values(own, "--gid") == ["0"]


@pytest.mark.parametrize("field", ["exec_file", "jailer", "chroot_base_dir"])
def test_paths_must_be_absolute(field):
    with pytest.raises(ValueError, match=field):
        make_spec(**{field: Path("relative/path")})
    with pytest.raises(ValueError, match=field):
        make_spec(**{field: "/as/a/string"})


@pytest.mark.parametrize("sock", ["relative.sock", "/", "/../escape.sock", "/run/../../x.sock"])
def test_socket_paths_stay_inside_the_jail(sock):
    with pytest.raises(ValueError):
        make_spec(api_sock=sock)
    with pytest.raises(ValueError):
        make_spec(vsock_uds=sock)


def test_check_needs_both_binaries(tmp_path):
    firecracker = tmp_path / "firecracker"
    jailer = tmp_path / "jailer"
    spec = make_spec(exec_file=firecracker, jailer=jailer)
    with pytest.raises(MachineStartError, match="jailer"):
        spec.check()
    jailer.write_bytes(b"")
    with pytest.raises(MachineStartError, match="exec_file"):
        spec.check()
    firecracker.mkdir()
    with pytest.raises(MachineStartError, match="not a file"):
        spec.check()
    firecracker.rmdir()
    firecracker.write_bytes(b"")
    spec.check()


# --- layout -----------------------------------------------------------------------------------------

def test_chroot_layout():
    spec = make_spec(exec_file=Path("/opt/fc/firecracker-v1.10"), chroot_base_dir=Path("/var/lib/nimbus/jails"))
    root = Path(f"/var/lib/nimbus/jails/firecracker-v1.10/{UUID_ID}/root")
    assert jail.chroot_dir(spec) == root
    assert jail.api_socket_path(spec) == root / "run" / "firecracker.socket"
    assert jail.vsock_path(spec) == root / "vsock.sock"
    assert jail.pid_file_path(spec) == root / "firecracker-v1.10.pid"
    spec = make_spec(api_sock="/api.sock", vsock_uds="/run/v.sock")
    assert jail.api_socket_path(spec) == Path(f"/srv/jailer/firecracker/{UUID_ID}/root/api.sock")
    assert jail.vsock_path(spec) == Path(f"/srv/jailer/firecracker/{UUID_ID}/root/run/v.sock")


# --- staging ----------------------------------------------------------------------------------------

@pytest.fixture
def images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    kernel, rootfs = images / "vmlinux-6.1", images / "python3.ext4"
    kernel.write_bytes(b"kernel")
    rootfs.write_bytes(b"rootfs")
    return kernel, rootfs


@needs_root
def test_stage_files_hard_links_readable_but_not_owned_by_the_jail(tmp_path, images):
    kernel, rootfs = images
    rootfs.chmod(0o600)
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=123, gid=100)
    staged = jail.stage_files(spec, kernel, rootfs)
    assert staged == {"kernel": "/vmlinux", "rootfs": "/rootfs.ext4"}
    root = jail.chroot_dir(spec)
    for src, inside in ((kernel, staged["kernel"]), (rootfs, staged["rootfs"])):
        dst = root / inside.lstrip("/")
        assert dst.stat().st_ino == src.stat().st_ino
        assert dst.stat().st_nlink == 2
        assert (dst.stat().st_uid, dst.stat().st_gid) == (os.getuid(), os.getgid())  # not the jail's
        assert dst.stat().st_mode & 0o777 in (0o644, 0o444, 0o755, 0o555)  # but readable by it
    run = root / "run"
    assert run.is_dir() and (run.stat().st_uid, run.stat().st_gid) == (123, 100)
    assert jail.api_socket_path(spec).parent == run


def test_stage_files_copies_across_file_systems_and_warns(tmp_path, images, monkeypatch, caplog):
    kernel, rootfs = images

    def no_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(jail.os, "link", no_link)
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=os.geteuid(), gid=os.getegid())
    with caplog.at_level(logging.WARNING, logger="nimbus.machines.jail"):
        staged = jail.stage_files(spec, kernel, rootfs)
    root = jail.chroot_dir(spec)
    for src, inside in ((kernel, staged["kernel"]), (rootfs, staged["rootfs"])):
        dst = root / inside.lstrip("/")
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_ino != src.stat().st_ino
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("copying" in r.getMessage() for r in warnings)


def test_stage_files_does_not_hide_other_link_errors(tmp_path, images, monkeypatch):
    def no_link(src, dst, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(jail.os, "link", no_link)
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=os.geteuid(), gid=os.getegid())
    with pytest.raises(PermissionError):
        jail.stage_files(spec, *images)


@pytest.mark.parametrize("name", ["../vmlinux", "..", ".", "", "sub/vmlinux", "/etc/passwd"])
def test_stage_files_refuses_names_that_escape(tmp_path, images, name):
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=os.geteuid(), gid=os.getegid())
    with pytest.raises(ValueError):
        jail.stage_files(spec, *images, kernel_name=name)
    assert not (tmp_path / "jails" / "firecracker" / UUID_ID / "vmlinux").exists()


def test_stage_files_refuses_a_symlink_out_of_the_jail(tmp_path, images):
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=os.geteuid(), gid=os.getegid())
    root = jail.chroot_dir(spec)
    root.mkdir(parents=True)
    (root / "vmlinux").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside"):
        jail.stage_files(spec, *images)
    assert not (tmp_path / "outside").exists()


def test_stage_files_refuses_missing_images(tmp_path, images):
    spec = make_spec(chroot_base_dir=tmp_path / "jails", uid=os.geteuid(), gid=os.getegid())
    with pytest.raises(ValueError, match="not a file"):
        jail.stage_files(spec, images[0], tmp_path / "missing.ext4")


# --- without the jailer -----------------------------------------------------------------------------

def test_direct_mode_argv_and_warning(caplog):
    assert jail.direct_argv(Path("/usr/bin/firecracker"), Path("/run/nimbus/vm1.sock")) == [
        "/usr/bin/firecracker", "--api-sock", "/run/nimbus/vm1.sock"]
    with caplog.at_level(logging.WARNING, logger="nimbus.machines.jail"):
        jail.warn_unconfined("vm1")
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "without the jailer" in record.getMessage() and "unconfined" in record.getMessage()
    assert "vm1" in record.getMessage()


# --- against jailer.md itself -----------------------------------------------------------------------

def documented_usage() -> tuple[set[str], set[str]]:
    """(all flags, required flags) from the ``jailer ...`` usage block in jailer.md's "Jailer Usage"."""
    if not JAILER_MD.is_file():
        pytest.skip(f"Firecracker's jailer.md not found at {JAILER_MD} (set NIMBUS_FIRECRACKER_SPEC_DIR)")
    text = JAILER_MD.read_text()
    usage = re.search(r"^## Jailer Usage\n.*?```\w*\n(jailer .*?)```", text, re.S | re.M)
    assert usage, "no usage block under '## Jailer Usage' in jailer.md"
    block = usage.group(1)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", block))
    optional = set(re.findall(r"\[(--[a-z][a-z-]*)", block))
    assert flags and optional <= flags
    return flags, flags - optional


def test_usage_block_parses_as_expected():
    flags, required = documented_usage()
    assert required == {"--id", "--exec-file", "--uid", "--gid"}
    # each flag is also described in a bullet of its own
    text = JAILER_MD.read_text()
    for flag in flags:
        assert re.search(rf"^- .*`{re.escape(flag)}`", text, re.M), flag


@pytest.mark.parametrize("spec", [
    make_spec(),
    make_spec(cgroup_version=1, netns=Path("/var/run/netns/x"), parent_cgroup="nimbus", daemonize=True,
              new_pid_ns=False, resource_limits=(("fsize", 1), ("no-file", 64)), firecracker_args=("--no-api",)),
], ids=["defaults", "everything"])
def test_every_emitted_flag_is_documented(spec):
    flags, required = documented_usage()
    own, _ = split_argv(jail.jailer_argv(spec))
    emitted = {a for a in own if a.startswith("--")}
    assert emitted <= flags, emitted - flags
    assert required <= emitted
    text = JAILER_MD.read_text()
    assert re.search(r"after\s+`--`\s+are\s+forwarded", text), "jailer.md no longer documents the -- separator"


def test_cgroup_dirs_are_where_the_jailer_makes_them(tmp_path):
    v2 = make_spec(cgroup_version=2)
    assert jail.cgroup_dirs(v2, tmp_path) == [tmp_path / "firecracker" / v2.id]
    assert jail.cgroup_dirs(make_spec(cgroup_version=2, parent_cgroup="nimbus/vms"), tmp_path) == \
        [tmp_path / "nimbus" / "vms" / v2.id]
    # v1: one hierarchy per controller named in --cgroup (memory, cpu), found by the mount's name.
    for name in ("memory", "cpu,cpuacct", "pids", "blkio"):
        (tmp_path / name).mkdir()
    (tmp_path / "cpu").symlink_to("cpu,cpuacct")
    v1 = make_spec(cgroup_version=1)
    assert jail.cgroup_dirs(v1, tmp_path) == [tmp_path / "cpu,cpuacct" / "firecracker" / v1.id,
                                              tmp_path / "memory" / "firecracker" / v1.id]


def test_stage_files_takes_extra_files_and_no_kernel(tmp_path, images):
    _, rootfs = images
    state = tmp_path / "snapshot.state"
    state.write_text("{}")
    spec = make_spec(chroot_base_dir=tmp_path / "jail", uid=os.getuid(), gid=os.getgid())
    staged = jail.stage_files(spec, None, rootfs, extra={"snapshot.state": state})
    assert staged == {"rootfs": "/rootfs.ext4", "snapshot.state": "/snapshot.state"}
    root = jail.chroot_dir(spec)
    assert not (root / "vmlinux").exists()
    assert (root / "snapshot.state").stat().st_ino == state.stat().st_ino
