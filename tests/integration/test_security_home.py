"""Finding 5 of the security review: the node's home and database are closed to other local accounts."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sandbox


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_f5_home_and_database_are_private(tmp_path, make_node):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # as an operator's mkdir under umask 022 leaves it
    db = home / "nimbus.db"
    with make_node(home, f"sqlite:///{db}") as running, running.client() as api:
        created = api.post("/api/v1/functions", json={"name": "private-probe", "runtime": "python3",
                                                      "code": "def handler(e, c):\n    return 1\n",
                                                      "env": {"TOKEN": "s3cret"}})
        assert created.status_code == 201, created.text
        assert api.post("/api/v1/functions/private-probe/invoke", json={}).status_code == 200
        assert _mode(home) == 0o700
        for suffix in ("", "-wal", "-shm"):
            path = home / f"nimbus.db{suffix}"
            if path.exists():
                assert _mode(path) & 0o077 == 0, f"{path.name} is {_mode(path):o}"
        assert (home / "nimbus.db-wal").exists()  # the WAL holds the rows too, and was checked above


def test_f5_existing_world_readable_database_is_tightened(tmp_path, make_node):
    home = tmp_path / "home"
    home.mkdir()
    db = home / "nimbus.db"
    db.touch()
    os.chmod(db, 0o644)
    with make_node(home, f"sqlite:///{db}"):
        assert _mode(db) == 0o600


def test_f5_doctor_warns_about_a_home_others_can_read(tmp_path):
    home = tmp_path / "open-home"
    home.mkdir()
    os.chmod(home, 0o755)
    (home / "nimbus.db").touch()
    os.chmod(home / "nimbus.db", 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    env["NIMBUS_HOME"] = str(home)
    nimbus = Path(sys.executable).parent / "nimbus"
    out = subprocess.run([str(nimbus), "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.split()[1:2] == ["home"])
    assert line.startswith("warning"), line
    assert "755" in line and "644" in line, line

    os.chmod(home, 0o700)
    os.chmod(home / "nimbus.db", 0o600)
    out = subprocess.run([str(nimbus), "doctor"], capture_output=True, text=True, env=env, timeout=300)
    line = next(line for line in out.stdout.splitlines() if line.split()[1:2] == ["home"])
    assert line.startswith("ok"), line
