"""``nimbus images``: build and list the Firecracker driver's guest images and kernels, on this host.

The only client commands that need no node: they write under NIMBUS_HOME/images directly.
"""

import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from nimbus.cli.client import fail
from nimbus.cli.output import Steps, mib, note, table

images_app = typer.Typer(
    help="Build and list guest images (ext4 root file systems and kernels) for the Firecracker driver.",
    no_args_is_help=True,
)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", envvar="NIMBUS_HOME", help="Nimbus's home; images go to HOME/images.",
                 show_envvar=True, show_default=False),
]


class ImageBase(str, Enum):
    tree = "tree"
    debootstrap = "debootstrap"


def _images_home(home: Path | None) -> Path:
    from nimbus.config import DEFAULT_HOME

    return home if home is not None else DEFAULT_HOME


@images_app.command("build")
def images_build(
    runtime: Annotated[str, typer.Option("--runtime", "-r", help="The runtime the image is for: python3, nodejs, "
                                         "go, rust, wasm or provided.")],
    base: Annotated[ImageBase, typer.Option("--base", help="tree: a small tree copied from this host (seconds); "
                                            "debootstrap: Debian minbase plus the runtime (minutes, network).",
                                            case_sensitive=False)] = ImageBase.tree,
    suite: Annotated[str | None, typer.Option("--suite", help="Debian suite for --base debootstrap "
                                                 "(default: bookworm)", show_default=False)] = None,
    mirror: Annotated[str | None, typer.Option("--mirror", help="Debian mirror for --base debootstrap "
                                                  "(default: this host's apt mirror)", show_default=False)] = None,
    size_mb: Annotated[int | None, typer.Option("--size-mb", min=1, help="File system size; default: "
                                                   "the files plus headroom.", show_default=False)] = None,
    home: HomeOption = None,
) -> None:
    """Build the runtime's image unless one of the same content is cached; prints its path."""
    from nimbus.machines.firecracker import images

    if base is ImageBase.tree and (suite is not None or mirror is not None):
        fail("--suite and --mirror go with --base debootstrap")
    home = _images_home(home)
    began = time.monotonic()
    steps = Steps()
    try:
        image = images.build_image(home, runtime, base=base.value, suite=suite, mirror=mirror, size_mb=size_mb,
                                   progress=steps)
    except images.ImageError as exc:
        fail(str(exc))
    finally:
        steps.close()
    note(f"{runtime} image ({base.value}): {mib(image.stat().st_size)} in {time.monotonic() - began:.1f} s")
    typer.echo(str(image))


@images_app.command("kernel")
def images_kernel(
    config: Annotated[Path | None, typer.Option("--config", help="Kernel configuration to build with (required "
                                                   "unless --from).", show_default=False)] = None,
    from_path: Annotated[Path | None, typer.Option("--from", help="Register this vmlinux instead of building "
                                                      "one.", show_default=False)] = None,
    source: Annotated[Path | None, typer.Option("--source", help="Kernel source tarball (default: the newest "
                                                   "/usr/src/linux-source-*.tar.xz)", show_default=False)] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Parallel make jobs (default: the "
                                                "number of CPUs)", show_default=False)] = None,
    home: HomeOption = None,
) -> None:
    """Build a guest kernel (vmlinux) from Debian's linux-source, or register one with --from; prints its path.

    A build takes tens of minutes; make's output is streamed to stderr. Run again after a failure to resume.
    """
    from nimbus.machines.firecracker import kernel

    home = _images_home(home)
    began = time.monotonic()
    try:
        if from_path is not None:
            if config is not None or source is not None:
                fail("--from registers a built kernel: it takes no --config or --source")
            path = kernel.register_kernel(home, from_path, progress=note)
        else:
            if config is None:
                fail(f"--config PATH is required to build a kernel; {kernel.CONFIG_HINT}")
            path = kernel.build_kernel(home, config, source=source, jobs=jobs, progress=note)
    except kernel.KernelError as exc:
        fail(str(exc))
    note(f"kernel: {mib(path.stat().st_size)} in {time.monotonic() - began:.1f} s")
    typer.echo(str(path))


@images_app.command("ls")
def images_ls(home: HomeOption = None) -> None:
    """List the cached images and kernels."""
    from nimbus.machines.firecracker import images, kernel

    home = _images_home(home)
    rows = []
    for path in images.list_images(home):
        name = images.parse_image_name(path)
        if name is None:
            continue
        rows.append(["image", f"{name.runtime} ({name.base})", name.digest, path])
    for path in kernel.list_kernels(home):
        version, _, digest = path.name[len(kernel.KERNEL_PREFIX):].rpartition("-")
        rows.append(["kernel", version, digest, path])
    if not rows:
        note("no images")
        return
    cells = []
    for kind, what, digest, path in rows:
        stat = path.stat()
        cells.append([kind, what, digest, mib(stat.st_size),
                      datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M:%S"), str(path)])
    typer.echo(table(["KIND", "WHAT", "HASH", "SIZE", "BUILT", "PATH"], cells))
