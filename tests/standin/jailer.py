#!/usr/bin/env python3
"""A TEST STAND-IN for Firecracker's ``jailer``. It is NOT the jailer and confines NOTHING.

It exists so the Firecracker driver's jailed start-up (command line, jail layout, pid file, sockets
inside the jail) can be exercised on hosts without the real binaries. It lives under ``tests/`` only.

What it does, as ``jailer.md`` describes the jailer:

* Parses the command line: required ``--id``, ``--exec-file``, ``--uid``, ``--gid``; optional
  ``--chroot-base-dir`` (default ``/srv/jailer``), ``--cgroup`` (repeatable, ``<file>=<value>``),
  ``--cgroup-version`` (1 or 2, default 1), ``--parent-cgroup`` (default the exec file's name),
  ``--netns``, ``--resource-limit`` (repeatable, ``fsize|no-file=<value>``), ``--daemonize``,
  ``--new-pid-ns``; everything after ``--`` is for Firecracker. Values may follow as the next argument
  or after ``=``. Validates them: the id is letters, digits and hyphens, at most 64 characters; the
  exec file exists, is a regular file, and its name contains ``firecracker`` (the real jailer's own
  rule, not stated in jailer.md); uid and gid are numbers; cgroup settings look like
  ``<controller>.<name>=<value>``; the parent cgroup is a relative path without ``..``; the netns file
  exists; resource limits name a documented resource and a number; a flag given twice that is not
  repeatable, an unknown flag or a missing value is an error. Errors: a message on stderr, exit 1,
  nothing made.
* Creates ``<chroot_base>/<exec_file_name>/<id>/root/`` (an existing one is used as it is), copies
  the exec file to ``<root>/<exec_file_name>`` (mode kept), writes ``<root>/<exec_file_name>.pid`` with
  the pid Firecracker will have (this process's: it execs in place), and records what it was given in
  ``<root>/jailer-argv.json`` (``argv``, and the parsed ``options``) for tests to inspect.
* Sets ``--resource-limit`` values (or the default ``no-file=2048``) with ``setrlimit`` when this
  unprivileged process may (a limit above the current hard limit is logged and left).
* With ``--daemonize``: ``setsid()`` and standard I/O to ``/dev/null``, as the jailer does.
* Closes inherited file descriptors above 2, clears the environment, then execs the COPY in the jail
  (by its shebang, so it must not depend on where it lies: ``standin.install()`` writes such a wrapper)
  with the working directory set to the jail's root, the environment holding only
  ``NIMBUS_STANDIN_ROOT=<root>`` (the stand-in Firecracker takes absolute paths under it, emulating
  the chroot), and the arguments ``--id=<id> --start-time-us=<n> --start-time-cpu-us=<n>`` followed by
  those after ``--``.

What it does NOT do: chroot or pivot_root, unshare any namespace (mount, PID with ``--new-pid-ns``,
network with ``--netns``), create or join cgroups or write their values, mknod ``/dev/kvm`` or
``/dev/net/tun``, chown the jail, or change uid/gid. The "jailed" process runs with the caller's
privileges and sees the whole file system.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

ID_MAX_LEN = 64
DEFAULT_CHROOT_BASE = "/srv/jailer"
DEFAULT_CGROUP_VERSION = "1"
DEFAULT_NO_FILE = 2048
ROOT_ENV = "NIMBUS_STANDIN_ROOT"
ARGV_RECORD = "jailer-argv.json"
VALUE_FLAGS = ("--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--cgroup", "--cgroup-version",
               "--parent-cgroup", "--netns", "--resource-limit")
REPEATABLE = ("--cgroup", "--resource-limit")
SWITCHES = ("--daemonize", "--new-pid-ns")
REQUIRED = ("--id", "--exec-file", "--uid", "--gid")
RESOURCES = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
U32_MAX = 0xFFFFFFFF


class JailerError(Exception):
    pass


def log(message: str) -> None:
    print(f"jailer (nimbus test stand-in): {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """The jailer's options (repeatable ones as lists) and Firecracker's arguments (after ``--``)."""
    options: dict = {"--cgroup": [], "--resource-limit": []}
    args = list(argv)
    extra: list[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--":
            extra = args
            break
        name, eq, value = arg.partition("=")
        if name in SWITCHES:
            if eq:
                raise JailerError(f"argument {name} takes no value")
            if name in options:
                raise JailerError(f"argument {name} given more than once")
            options[name] = True
            continue
        if name not in VALUE_FLAGS:
            raise JailerError(f"unexpected argument {arg!r}")
        if not eq:
            if not args or args[0].startswith("--"):
                raise JailerError(f"argument {name} needs a value")
            value = args.pop(0)
        if name in REPEATABLE:
            options[name].append(value)
        elif name in options:
            raise JailerError(f"argument {name} given more than once")
        else:
            options[name] = value
    for name in REQUIRED:
        if name not in options:
            raise JailerError(f"argument {name} is required")
    return options, extra


def validate(options: dict) -> dict:
    """The checked settings; JailerError on the first invalid one."""
    jail_id = options["--id"]
    if not re.fullmatch(r"[A-Za-z0-9-]+", jail_id):
        raise JailerError(f"invalid --id {jail_id!r}: only letters, digits and hyphens")
    if len(jail_id) > ID_MAX_LEN:
        raise JailerError(f"invalid --id: {len(jail_id)} characters, at most {ID_MAX_LEN}")
    exec_file = Path(options["--exec-file"])
    if not exec_file.exists():
        raise JailerError(f"--exec-file {exec_file}: no such file")
    if not exec_file.is_file():
        raise JailerError(f"--exec-file {exec_file} is not a regular file")
    exec_file = exec_file.resolve()
    if "firecracker" not in exec_file.name:
        raise JailerError(f"--exec-file {exec_file}: the file name must contain \"firecracker\"")
    ids = {}
    for name in ("--uid", "--gid"):
        value = options[name]
        if not (value.isascii() and value.isdigit()) or int(value) > U32_MAX:
            raise JailerError(f"invalid {name} {value!r}: a number is needed")
        ids[name] = int(value)
    version = options.get("--cgroup-version", DEFAULT_CGROUP_VERSION)
    if version not in ("1", "2"):
        raise JailerError(f"invalid --cgroup-version {version!r}: 1 or 2")
    for setting in options["--cgroup"]:
        if not re.fullmatch(r"[A-Za-z0-9_]+\.[A-Za-z0-9_.]+=.+", setting):
            raise JailerError(f"invalid --cgroup {setting!r}: <cgroup_file>=<value> expected, e.g. cpuset.cpus=0")
    parent = options.get("--parent-cgroup", exec_file.name)
    if not parent or parent.startswith("/") or ".." in parent.split("/"):
        raise JailerError(f"invalid --parent-cgroup {parent!r}: a relative path without '..'")
    netns = options.get("--netns")
    if netns is not None and not Path(netns).exists():
        raise JailerError(f"--netns {netns}: no such file")
    limits = []
    for setting in options["--resource-limit"]:
        name, eq, value = setting.partition("=")
        if not eq or name not in RESOURCES or not (value.isascii() and value.isdigit()):
            raise JailerError(f"invalid --resource-limit {setting!r}: fsize=<n> or no-file=<n>")
        limits.append((name, int(value)))
    base = Path(options.get("--chroot-base-dir", DEFAULT_CHROOT_BASE))
    if not base.is_absolute():
        base = Path.cwd() / base
    return {"id": jail_id, "exec_file": exec_file, "uid": ids["--uid"], "gid": ids["--gid"],
            "cgroup_version": int(version), "cgroups": list(options["--cgroup"]), "parent_cgroup": parent,
            "netns": netns, "resource_limits": limits or [("no-file", DEFAULT_NO_FILE)],
            "chroot_base_dir": base, "daemonize": bool(options.get("--daemonize")),
            "new_pid_ns": bool(options.get("--new-pid-ns"))}


def set_limits(limits: list[tuple[str, int]]) -> None:
    for name, value in limits:
        which = RESOURCES[name]
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            log(f"resource limit {name}={value} is above the hard limit {hard}; left unchanged (not root)")
            continue
        resource.setrlimit(which, (value, value))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.monotonic()
    started_cpu = time.process_time()
    try:
        options, firecracker_args = parse_args(argv)
        settings = validate(options)
    except JailerError as exc:
        log(str(exc))
        return 1
    exec_name = settings["exec_file"].name
    root = settings["chroot_base_dir"] / exec_name / settings["id"] / "root"
    try:
        root.mkdir(parents=True, exist_ok=True)
        jailed = root / exec_name
        shutil.copy2(settings["exec_file"], jailed)
        (root / f"{exec_name}.pid").write_text(f"{os.getpid()}\n")
        record = {"argv": [sys.argv[0], *argv], "firecracker_args": firecracker_args,
                  "options": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
                  "stand_in": "nimbus test stand-in: nothing was confined"}
        (root / ARGV_RECORD).write_text(json.dumps(record, indent=1))
        set_limits(settings["resource_limits"])
    except OSError as exc:
        log(f"cannot build the jail at {root}: {exc}")
        return 1
    if settings["daemonize"]:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    os.closerange(3, 1 << 16)
    os.chdir(root)
    spent_us = int((time.monotonic() - started) * 1e6)
    spent_cpu_us = int((time.process_time() - started_cpu) * 1e6)
    args = [f"./{exec_name}", f"--id={settings['id']}", f"--start-time-us={spent_us}",
            f"--start-time-cpu-us={spent_cpu_us}", *firecracker_args]
    try:
        os.execve(jailed, args, {ROOT_ENV: str(root)})
    except OSError as exc:
        log(f"cannot exec {jailed}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
