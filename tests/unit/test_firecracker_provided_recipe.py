"""The ``provided`` image's recipe (``nimbus.machines.firecracker.userland`` and its use in ``images``),
from dpkg file lists written here: which host files go in, where, and what a missing package says."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nimbus.agent.contract import SANDBOX_ENV
from nimbus.machines import layout
from nimbus.machines.firecracker import images, userland


def _lists(directory: Path, **packages: list[str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, paths in packages.items():
        (directory / f"{name}.list").write_text("".join(f"{p}\n" for p in ["/.", "/usr", "/usr/bin", *paths]))
    return directory


def test_only_executables_in_bin_directories_go_in_at_merged_usr_paths(tmp_path):
    cat = Path(os.path.realpath("/bin/cat"))
    info = _lists(tmp_path / "info", one=["/bin/cat", "/usr/share/doc/one/copyright", "/etc/passwd",
                                          "/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/missing-here"],
                  two=["/bin/sh", "/usr/bin/sub/dir/cat"])
    found = userland.tree_userland(("one", "two"), info)
    assert dict(found.files) == {"/usr/bin/cat": cat}  # dpkg's /bin/cat, kept once, under /usr
    # The package's own /bin/sh (a link to dash on Debian) loses: /bin/sh is bash, as on Amazon Linux.
    assert dict(found.links) == {"/usr/bin/sh": "bash", "/bin": "usr/bin"}


def test_links_to_siblings_stay_links_and_others_are_left_out(tmp_path):
    host = [p for p in ("/bin/rbash", "/usr/bin/c++", "/usr/bin/editor") if os.path.islink(p)]
    if "/bin/rbash" not in host or len(host) < 2:
        pytest.skip("this host lacks /bin/rbash, or any /usr/bin link to an absolute path")
    found = userland.tree_userland(("pkg",), _lists(tmp_path / "info", pkg=host))
    links = dict(found.links)
    assert links["/usr/bin/rbash"] == "bash"
    assert not any(p.endswith(("c++", "editor")) for p in links) and found.files == ()


def test_a_package_the_host_lacks_is_named(tmp_path, monkeypatch):
    info = _lists(tmp_path / "info", bash=[])
    with pytest.raises(userland.HostMissing, match=r"curl is not installed on this host \(apt-get install curl\)"):
        userland.tree_userland(("bash", "curl"), info)
    (info / "curl:amd64.list").write_text("/usr/bin/curl\n")  # a multi-arch package's list
    userland.tree_userland(("bash", "curl"), info)
    monkeypatch.setattr(userland, "DPKG_INFO", tmp_path / "nowhere")
    with pytest.raises(images.ImageError, match="--base debootstrap"):
        images.plan("provided")


def test_versions_come_from_a_dpkg_status_file(tmp_path):
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(
        "Package: curl\nStatus: install ok installed\nVersion: 7.88.1-10\n\n"
        "Package: bash\nStatus: deinstall ok config-files\nVersion: 5.0\n\n"
        "Package: coreutils\nStatus: install ok installed\nVersion: 9.1-1\n")
    assert userland.tools(tmp_path) == {
        "sh": {"version": "bash unknown", "path": "/bin/sh"},  # removed: only its configuration is left
        "coreutils": {"version": "9.1-1", "path": "/usr/bin"},
        "curl": {"version": "7.88.1-10", "path": "/usr/bin/curl"},
    }
    assert userland.dpkg_versions(tmp_path / "absent", ("curl",)) == {}


def test_provided_is_an_image_runtime():
    assert "provided" in images.SUPPORTED_RUNTIMES
    name = images.parse_image_name(Path("provided-0123456789ab.ext4"))
    assert name == images.ImageName("provided", "tree", "0123456789ab")
    assert images.parse_image_name(Path("provided-debootstrap-0123456789ab.ext4")).base == "debootstrap"
    assert images.DEBOOTSTRAP_PACKAGES["provided"] == ("python3", "curl")


def test_every_image_has_the_interpreter_link_and_bwrap_s_environment(tmp_path):
    script = images._init_script(sys.executable).decode()
    assert f"os.environ.update({SANDBOX_ENV!r})" in script
    entries = {e.path: e for e in images.debootstrap_entries("python3")}
    assert entries[layout.PYTHON_LINK].link == images.DEBIAN_PYTHON
    # The generated init, run with the kernel's environment, hands the agent bwrap's: stop it at the import.
    probe = script.replace("from nimbus.agent.init import main\nmain(sys.argv[1:])\n",
                           "print(sorted(os.environ.items()))\n")
    done = subprocess.run([sys.executable, "-IS", "-c", probe.split("\n", 1)[1]], capture_output=True, text=True,
                          env={"HOME": "/", "TERM": "linux"}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(sorted(SANDBOX_ENV.items()))
