"""Where the tests find Firecracker's reference files (API schema, jailer.md): read there, never copied.

``$NIMBUS_FIRECRACKER_SPEC_DIR`` when set; else ``../shared/firecracker`` beside the repository; else the
development machines' ``/work/shared/firecracker`` (a clean clone made elsewhere, as CI's is, still finds
it). Tests that need a file that none of these holds skip and say where they looked.
"""

import os
from pathlib import Path

FALLBACK = Path("/work/shared/firecracker")


def spec_dir() -> Path:
    configured = os.environ.get("NIMBUS_FIRECRACKER_SPEC_DIR")
    if configured:
        return Path(configured)
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "firecracker"
    for candidate in (beside, FALLBACK):
        if (candidate / "firecracker.yaml").is_file():
            return candidate
    return beside
