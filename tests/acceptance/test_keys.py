"""``nimbus up --auth on`` and ``nimbus keys`` as an operator drives them: the first admin key from the node's
output, keys made, listed and revoked with the CLI, and tenants kept apart, all through subprocesses.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent / "conftest.py"
FIRST_KEY = re.compile(r"NIMBUS FIRST ADMIN API KEY.*?\n\s+(nmb_[A-Za-z0-9_-]+)\n", re.S)
HELLO = "def handler(event, context):\n    return {'hi': event.get('name', 'world')}\n"


@pytest.fixture(scope="module")
def helpers(request):
    # the acceptance conftest's Cli, free_port, _wait_healthy, _stop (it is a module named "conftest" among several)
    return request.config.pluginmanager.get_plugin(str(ROOT))


class AuthNode:
    """``nimbus up --auth on`` on a free port with a home of its own; its output goes to a log file."""

    def __init__(self, helpers, nimbus_bin: str, workdir: Path) -> None:
        self.helpers, self.nimbus_bin, self.workdir = helpers, nimbus_bin, workdir
        self.home = workdir / "home"
        self.log_path = workdir / "node.log"
        self.process = None
        self.url = ""

    def start(self) -> str:
        """Start the node; returns what it printed while starting."""
        port = self.helpers.free_port()
        self.url = f"http://127.0.0.1:{port}"
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.nimbus_bin, "up", "--auth", "on", "--port", str(port), "--home", str(self.home)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**self.helpers._clean_env(), "NIMBUS_MIN_WARM": "1", "NIMBUS_RUNTIMES": "python3"},
            )
        self.helpers._wait_healthy(self.url, self.process, self.log_path)
        return self.log_path.read_bytes()[before:].decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            self.helpers._stop(self.process)


@pytest.fixture(scope="module")
def auth_node(helpers, nimbus_bin, tmp_path_factory):
    node = AuthNode(helpers, nimbus_bin, tmp_path_factory.mktemp("auth-node"))
    printed = node.start()
    try:
        found = FIRST_KEY.findall(printed)
        assert len(found) == 1, printed[-3000:]
        yield node, found[0]
    finally:
        node.stop()


@pytest.fixture
def cli(helpers, nimbus_bin, auth_node, tmp_path):
    node, admin = auth_node

    def run(*args: str, key: str | None = admin, **kwargs):
        env = {"NIMBUS_API_KEY": key} if key else {}
        return helpers.Cli(nimbus_bin, node.url, tmp_path)(*args, env=env, **kwargs)

    return run


def test_help_lists_keys(nimbus_offline):
    result = nimbus_offline("keys", "--help")
    assert result.code == 0, result
    for command in ("create", "ls", "revoke"):
        assert command in result.stdout


def test_without_a_key_the_cli_says_what_to_set(cli):
    result = cli("ls", key=None)
    assert result.code == 1, result
    assert result.stderr.startswith("error: Unauthorized:"), result
    assert "set NIMBUS_API_KEY" in result.stderr


def test_keys_create_ls_revoke_and_tenants(cli, tmp_path):
    source = tmp_path / "main.py"
    source.write_text(HELLO)

    made = cli("keys", "create", "--tenant", "acme", "--name", "ci")
    assert made.code == 0, made
    acme_key = made.stdout.strip()
    assert acme_key.startswith("nmb_") and "\n" not in acme_key
    assert "shown only now" in made.stderr
    other = cli("keys", "create", "--tenant", "globex", "--json")
    assert other.code == 0, other
    globex = other.json()
    assert globex["tenant"] == "globex" and globex["key"].startswith(globex["prefix"])

    listed = cli("keys", "ls")
    assert listed.code == 0, listed
    assert listed.stdout.splitlines()[0].split() == ["ID", "PREFIX", "TENANT", "NAME", "ADMIN", "CREATED", "REVOKED"]
    acme_row = next(line for line in listed.stdout.splitlines() if " acme " in line)
    assert acme_key[:12] + "..." in acme_row and " ci " in acme_row
    assert acme_key not in listed.stdout and globex["key"] not in listed.stdout
    only = cli("keys", "ls", "--tenant", "acme", "--json").json()["keys"]
    assert [k["tenant"] for k in only] == ["acme"]
    acme_id = only[0]["id"]

    # a tenant's functions are its own
    deployed = cli("deploy", str(source), "--name", "greeter", "--runtime", "python3", key=acme_key)
    assert deployed.code == 0, deployed
    called = cli("invoke", "greeter", "--data", '{"name": "acme"}', key=acme_key)
    assert called.code == 0 and called.json()["output"] == {"hi": "acme"}, called
    assert "greeter" in cli("ls", key=acme_key).stdout
    assert "greeter" not in cli("ls", key=globex["key"]).stdout + cli("ls").stdout
    for missing in (cli("invoke", "greeter", key=globex["key"]), cli("invoke", "greeter")):  # globex, admin
        assert missing.code == 1 and "Not Found" in missing.stderr, missing
    invocation = called.json()["invocation_id"]
    assert cli("logs", invocation, key=acme_key).code == 0
    assert "Not Found" in cli("logs", invocation, key=globex["key"]).stderr

    # only admin keys manage keys
    refused = cli("keys", "ls", key=acme_key)
    assert refused.code == 1 and refused.stderr.startswith("error: Forbidden:"), refused
    assert cli("keys", "create", "--tenant", "acme", "--admin", key=acme_key).code == 1

    revoked = cli("keys", "revoke", acme_id)
    assert revoked.code == 0 and revoked.stdout.startswith(f"revoked {acme_id}"), revoked
    after = cli("ls", key=acme_key)
    assert after.code == 1 and "revoked" in after.stderr, after
    assert next(k for k in cli("keys", "ls", "--json").json()["keys"] if k["id"] == acme_id)["revoked_at"]
    assert cli("keys", "revoke", "no-such-key").code == 1


def test_restart_prints_no_second_key(auth_node, cli):
    node, admin = auth_node
    node.stop()
    printed = node.start()
    assert "NIMBUS FIRST ADMIN API KEY" not in printed and admin not in printed, printed
    result = cli("keys", "ls", "--json")  # the first key still works (the fixture's url follows the new port)
    assert result.code == 0, result


def test_keys_on_a_node_with_auth_off(nimbus):
    result = nimbus("keys", "ls")
    assert result.code == 1, result
    assert "NIMBUS_AUTH=off" in result.stderr
