"""The ``nimbus`` command as a user drives it: deploy, invoke, inspect, delete, against a real node.

Tests that need no node (doctor, usage errors, local validation, an absent node, ``up`` refusing an
unsafe bind) come first and use ``nimbus_offline``; the rest share one node started with ``nimbus up``
and use names of their own.
"""

import json
import re
import socket
import textwrap
import time

HELLO = textwrap.dedent("""\
    def handler(event, context):
        name = event.get("name", "world")
        print(f"saying hello to {name}")
        return {"greeting": f"hello {name}", "function": context.function_name}
""")

HELLO_V2 = textwrap.dedent("""\
    def handler(event, context):
        return {"greeting": "hi " + event.get("name", "world"), "v": 2}
""")

FAILING = textwrap.dedent("""\
    def handler(event, context):
        print("about to fail")
        raise ValueError("boom: " + str(event.get("why")))
""")

ASYNC_FN = textwrap.dedent("""\
    import time

    def handler(event, context):
        time.sleep(0.2)
        print("async marker", event["n"])
        return {"n": event["n"] * 2}
""")

WITH_ENV = textwrap.dedent("""\
    import os

    def handler(event):
        return {"greeting": os.environ["GREETING"]}
""")

POLL_TIMEOUT_S = 60.0


def _source(tmp_path, text: str, filename: str = "main.py"):
    path = tmp_path / filename
    path.write_text(text)
    return path


def _deploy(nimbus, tmp_path, name: str, text: str, *extra: str):
    result = nimbus("deploy", str(_source(tmp_path, text)), "--name", name, "--runtime", "python3", *extra)
    assert result.code == 0, result
    return result


# ---------------------------------------------------------------- no node needed


def test_help_lists_every_command(nimbus_offline):
    result = nimbus_offline("--help")
    assert result.code == 0, result
    for command in ("up", "serve", "deploy", "invoke", "ls", "get", "rm", "invocations", "logs", "doctor"):
        assert command in result.stdout


def test_doctor_reports_bwrap_ok(nimbus_offline):
    result = nimbus_offline("doctor")
    assert result.code == 0, result
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith(("ok ", "missing "))}
    assert lines["bwrap"].startswith("ok"), result
    for name in ("cgroups", "seccomp", "limits", "kvm", "firecracker", "jailer", "python3", "node", "go", "rust",
                 "wasm", "wasm32-wasip1", "builder:sandbox", "builder:docker"):
        assert name in lines, f"doctor does not report {name}:\n{result}"
    assert "drivers: bwrap" in result.stdout
    assert lines["builder:sandbox"].startswith("ok"), result
    assert lines["seccomp"].startswith("ok") and "EPERM" in lines["seccomp"], result
    for resource in ("memory:", "pids:", "cpu:", "syscalls: seccomp filter", "result: 6 MiB", "logs: last 64 KiB"):
        assert resource in lines["limits"], f"doctor's limits line lacks {resource!r}:\n{result}"


def test_doctor_json(nimbus_offline):
    result = nimbus_offline("doctor", "--json")
    assert result.code == 0, result
    report = result.json()
    assert report["checks"]["bwrap"]["ok"] is True
    assert report["checks"]["bwrap"]["sandbox"] is True
    assert report["drivers"]["bwrap"] is True
    assert report["runtimes"]["python3"] is True
    assert {"user namespaces", "cgroups", "seccomp", "limits", "kvm", "firecracker", "jailer", "node",
            "rust"} <= set(report["checks"])
    assert report["checks"]["seccomp"]["ok"] is True
    limits = report["checks"]["limits"]
    writable = report["checks"]["cgroups"]["writable"]
    # each limit names its mechanism: a cgroup controller where that one is writable, an rlimit (or none) where not
    assert limits["memory"].startswith("cgroup") == ("memory" in writable), limits
    assert limits["cpu"].startswith("cgroup") == ("cpu" in writable), limits
    assert limits["syscalls"] == "seccomp filter", limits
    assert report["builders"]["sandbox"] is True and isinstance(report["builders"]["docker"], bool)
    assert report["runtimes"]["wasm"] is True
    for check in report["checks"].values():
        assert check["status"] in ("ok", "missing") and check["detail"]


def test_doctor_says_what_the_firecracker_driver_would_find(nimbus_offline, tmp_path):
    home = tmp_path / "home"
    fake_kernel = tmp_path / "vmlinux"
    fake_kernel.write_bytes(b"\x7fELF")
    result = nimbus_offline("doctor", "--json", env={"NIMBUS_HOME": str(home), "NIMBUS_KERNEL": str(fake_kernel),
                                                      "NIMBUS_RUNTIMES": "python3"})
    assert result.code == 0, result
    images = result.json()["checks"]["guest-images"]
    assert images["kernel"] == str(fake_kernel) and images["images"] == {"python3": None}
    assert images["ok"] is False and "nimbus images build --runtime R" in images["detail"]
    if not result.json()["drivers"]["firecracker"]:
        text = nimbus_offline("doctor", env={"NIMBUS_HOME": str(home)})
        assert "NIMBUS_DRIVER=firecracker would be refused here (lacking:" in text.stdout, text


def test_no_node_at_the_url_is_a_clear_error(nimbus_offline):
    for args in (("ls",), ("invoke", "hello"), ("get", "hello"), ("logs", "some-id")):
        result = nimbus_offline(*args)
        assert result.code == 1, result
        assert result.stderr.startswith(f"error: no Nimbus node at {nimbus_offline.url}"), result
        assert "nimbus up" in result.stderr
        assert "Traceback" not in result.stderr


def test_url_option_overrides_the_environment(nimbus_offline):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        other = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound but not listening: refused
    result = nimbus_offline("ls", "--url", other)
    assert result.code == 1
    assert f"no Nimbus node at {other}" in result.stderr


def test_url_without_scheme_is_a_usage_error(nimbus_offline):
    result = nimbus_offline("ls", env={"NIMBUS_URL": "localhost:8080"})
    assert result.code == 2, result
    assert "must start with http://" in result.stderr


def test_invalid_data_is_refused_before_any_request(nimbus_offline):
    # The URL has no node: a network error would mean the event was not checked first.
    result = nimbus_offline("invoke", "hello", "--data", "{not json")
    assert result.code == 2, result
    assert result.stderr.startswith("error: --data is not valid JSON"), result


def test_invalid_data_file(nimbus_offline, tmp_path):
    bad = tmp_path / "event.json"
    bad.write_text("[1, 2,")
    result = nimbus_offline("invoke", "hello", "--data", f"@{bad}")
    assert result.code == 2, result
    assert f"--data file {bad} is not valid JSON" in result.stderr

    result = nimbus_offline("invoke", "hello", "--data", f"@{tmp_path / 'missing.json'}")
    assert result.code == 2, result
    assert "cannot read --data file" in result.stderr and "No such file" in result.stderr


def test_usage_errors_exit_2(nimbus_offline, tmp_path):
    source = _source(tmp_path, HELLO)
    assert nimbus_offline("deploy", str(source), "--runtime", "python3").code == 2  # no --name
    assert nimbus_offline("deploy", str(tmp_path / "nope.py"), "--name", "x", "--runtime", "python3").code == 2
    assert nimbus_offline("invoke").code == 2
    assert nimbus_offline("frobnicate").code == 2
    result = nimbus_offline("deploy", str(source), "--name", "x", "--runtime", "python3", "--env", "NOVALUE")
    assert result.code == 2
    assert "KEY=VALUE" in result.stderr


def test_up_refuses_a_public_host_without_auth(nimbus_offline, tmp_path):
    result = nimbus_offline("up", "--host", "0.0.0.0", "--port", "0", "--home", str(tmp_path / "home"), timeout=30)
    assert result.code == 2, result
    assert result.stderr.startswith("error: invalid configuration: refusing to bind 0.0.0.0"), result
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()


def test_up_rejects_a_bad_setting_from_the_environment(nimbus_offline, tmp_path):
    result = nimbus_offline("up", "--home", str(tmp_path / "home"), env={"NIMBUS_MIN_WARM": "lots"}, timeout=30)
    assert result.code == 2, result
    assert "NIMBUS_MIN_WARM" in result.stderr


def test_up_says_plainly_what_the_firecracker_driver_lacks(nimbus_offline, tmp_path):
    missing = tmp_path / "no-such-firecracker"
    result = nimbus_offline("up", "--home", str(tmp_path / "home"), timeout=30,
                            env={"NIMBUS_DRIVER": "firecracker", "NIMBUS_FIRECRACKER_BIN": str(missing)})
    assert result.code == 2, result
    assert "NIMBUS_DRIVER=firecracker cannot start machines" in result.stderr, result
    assert f"the firecracker binary {missing} is missing" in result.stderr, result
    assert "nimbus images kernel" in result.stderr and "nimbus images build --runtime python3" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- against a node


def test_deploy_and_invoke(nimbus, tmp_path):
    result = _deploy(nimbus, tmp_path, "cli-hello", HELLO)
    assert result.stdout.startswith("created cli-hello version 1: runtime python3"), result
    assert "code sha256 " in result.stdout

    result = nimbus("invoke", "cli-hello", "--data", '{"name": "ada"}')
    assert result.code == 0, result
    body = result.json()
    assert body["status"] == "succeeded"
    assert body["output"] == {"greeting": "hello ada", "function": "cli-hello"}
    assert body["start"] in ("cold", "warm", "hot")
    assert body["invocation_id"]
    assert result.stdout.startswith("{\n  "), "the result is printed pretty"

    event = tmp_path / "event.json"
    event.write_text(json.dumps({"name": "grace"}))
    result = nimbus("invoke", "cli-hello", "--data", f"@{event}")
    assert result.code == 0, result
    assert result.json()["output"]["greeting"] == "hello grace"

    result = nimbus("invoke", "cli-hello", "--data", "@-", input='{"name": "stdin"}')
    assert result.code == 0, result
    assert result.json()["output"]["greeting"] == "hello stdin"

    result = nimbus("invoke", "cli-hello")
    assert result.code == 0, result
    assert result.json()["output"]["greeting"] == "hello world"


def test_failing_function_exits_1(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-fails", FAILING)
    result = nimbus("invoke", "cli-fails", "--data", '{"why": "testing"}')
    assert result.code == 1, result
    body = result.json()
    assert body["status"] == "failed"
    assert body["error"]["type"] == "ValueError"
    assert "boom: testing" in body["error"]["message"]
    assert "failed: ValueError: boom: testing" in result.stderr

    result = nimbus("logs", body["invocation_id"])
    assert result.code == 0, result
    assert "about to fail" in result.stdout
    assert "failed" in result.stderr and "ValueError" in result.stderr


def test_redeploy_makes_version_2_and_ls_get_show_it(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-versions", HELLO)
    result = _deploy(nimbus, tmp_path, "cli-versions", HELLO_V2)
    assert result.stdout.startswith("updated cli-versions version 2: runtime python3"), result

    result = nimbus("invoke", "cli-versions", "--data", '{"name": "v2"}')
    assert result.code == 0, result
    assert result.json()["output"] == {"greeting": "hi v2", "v": 2}

    result = nimbus("ls")
    assert result.code == 0, result
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "RUNTIME", "VERSION", "MEMORY", "TIMEOUT", "UPDATED"]
    row = next(line.split() for line in rows if line.split()[0] == "cli-versions")
    assert row[1:6] == ["python3", "2", "128", "MB", "30"]

    assert "cli-versions" in nimbus("ls", "--runtime", "python3").stdout
    assert "cli-versions" not in nimbus("ls", "--runtime", "nodejs").stdout
    listed = nimbus("ls", "--json").json()
    assert any(fn["name"] == "cli-versions" and fn["version"] == 2 for fn in listed["functions"])

    result = nimbus("get", "cli-versions")
    assert result.code == 0, result
    fn = result.json()
    assert fn["name"] == "cli-versions" and fn["version"] == 2 and fn["runtime"] == "python3"
    assert fn["handler"] == "main.handler" and len(fn["code_sha256"]) == 64


def test_deploy_a_folder_as_a_package(nimbus, tmp_path):
    """A folder is zipped, leaving out what .gitignore and .nimbusignore list (and .git, __pycache__)."""
    project = tmp_path / "my-api"
    (project / "helpers").mkdir(parents=True)
    (project / "app.py").write_text(
        "import os\nfrom helpers.text import shout\n\n"
        "def handler(event, context):\n"
        "    here = os.path.dirname(__file__)\n"
        "    return {'said': shout(event['word']), 'files': sorted(os.listdir(here))}\n")
    (project / "helpers" / "__init__.py").write_text("")
    (project / "helpers" / "text.py").write_text("def shout(word):\n    return word.upper() + '!'\n")
    (project / ".gitignore").write_text("*.log\nscratch/\n")
    (project / ".nimbusignore").write_text("tests/\n")
    for left_out in ("debug.log", "scratch/notes.txt", "tests/test_app.py", ".git/config", "__pycache__/app.pyc"):
        (project / left_out).parent.mkdir(parents=True, exist_ok=True)
        (project / left_out).write_text("not deployed")
    result = nimbus("deploy", str(project), "--name", "cli-pkg", "--runtime", "python3", "--handler", "app.handler")
    assert result.code == 0, result
    assert "packed 4 files" in result.stderr, result
    fn = nimbus("get", "cli-pkg").json()
    assert fn["code_kind"] == "zip" and fn["handler"] == "app.handler"
    result = nimbus("invoke", "cli-pkg", "--data", '{"word": "hey"}')
    assert result.code == 0, result
    assert result.json()["output"] == {"said": "HEY!", "files": [".gitignore", "app.py", "helpers"]}


def test_deploy_a_folder_with_requirements_then_list_and_collect_its_layer(nimbus, tmp_path):
    """requirements.txt in the folder is resolved (from PyPI) into a layer the function imports from."""
    project = tmp_path / "with-deps"
    project.mkdir()
    (project / "app.py").write_text("import six\n\ndef handler(event, context):\n    return six.__version__\n")
    (project / "requirements.txt").write_text("six==1.16.0\n")
    result = nimbus("deploy", str(project), "--name", "cli-deps", "--runtime", "python3", "--handler", "app.handler")
    assert result.code == 0, result
    assert "resolving requirements.txt" in result.stderr and "dependencies resolved" in result.stdout, result
    layer = nimbus("get", "cli-deps").json()["layer_sha256"]
    assert nimbus("invoke", "cli-deps").json()["output"] == "1.16.0"
    result = nimbus("layers")
    assert result.code == 0, result
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["LAYER", "RUNTIME", "SIZE"]
    assert any(row.startswith(layer[:12]) and "cli-deps" in row for row in rows), result.stdout
    assert nimbus("rm", "cli-deps").code == 0
    result = nimbus("gc", "--grace", "0")
    assert result.code == 0, result
    assert re.search(r"removed [1-9][0-9]* layers", result.stdout), result.stdout
    assert layer not in nimbus("layers", "--json").stdout


def test_deploy_settings_and_env(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-env", WITH_ENV, "--env", "GREETING=bonjour", "--memory", "256",
            "--timeout", "5", "--concurrency", "2", "--isolation", "per-call")
    fn = nimbus("get", "cli-env").json()
    assert fn["env"] == {"GREETING": "bonjour"}
    assert (fn["memory_mb"], fn["timeout_s"], fn["concurrency"], fn["isolation"]) == (256, 5, 2, "per-call")
    result = nimbus("invoke", "cli-env")
    assert result.code == 0, result
    assert result.json()["output"] == {"greeting": "bonjour"}
    # A redeploy without the option keeps it; with it, changes it.
    _deploy(nimbus, tmp_path, "cli-env", WITH_ENV, "--memory", "128")
    assert (nimbus("get", "cli-env").json()["isolation"]) == "per-call"
    _deploy(nimbus, tmp_path, "cli-env", WITH_ENV, "--isolation", "shared")
    fn = nimbus("get", "cli-env").json()
    assert (fn["version"], fn["isolation"]) == (3, "shared")
    refused = nimbus("deploy", str(_source(tmp_path, WITH_ENV)), "--name", "cli-env", "--runtime", "python3",
                     "--isolation", "fresh")
    assert refused.code == 2 and "--isolation" in refused.stderr and "per-call" in refused.stderr, refused
    assert nimbus("get", "cli-env").json()["version"] == 3


def test_invocations_lists_the_calls(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-history", HELLO)
    ids = [nimbus("invoke", "cli-history", "--data", json.dumps({"name": str(i)})).json()["invocation_id"]
           for i in range(3)]
    result = nimbus("invocations", "cli-history")
    assert result.code == 0, result
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "START", "DURATION_MS", "CREATED"]
    assert [row.split()[0] for row in rows] == ids[::-1], "newest first"
    assert all(row.split()[1] == "succeeded" for row in rows)

    result = nimbus("invocations", "cli-history", "--limit", "1")
    assert [row.split()[0] for row in result.stdout.splitlines()[1:]] == ids[-1:]


def test_logs_show_what_the_function_printed(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-logs", HELLO)
    invocation = nimbus("invoke", "cli-logs", "--data", '{"name": "logbook"}').json()["invocation_id"]
    result = nimbus("logs", invocation)
    assert result.code == 0, result
    assert "saying hello to logbook" in result.stdout
    assert f"invocation {invocation} of cli-logs: succeeded" in result.stderr


def test_async_invoke_then_poll(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-async", ASYNC_FN)
    result = nimbus("invoke", "cli-async", "--async", "--data", '{"n": 21}')
    assert result.code == 0, result
    queued = result.json()
    assert queued["status"] == "queued" and queued["invocation_id"]
    invocation = queued["invocation_id"]

    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        result = nimbus("logs", invocation)
        assert result.code == 0, result
        if ": succeeded" in result.stderr:
            break
        assert ": failed" not in result.stderr and ": timed_out" not in result.stderr, result
        assert time.monotonic() < deadline, f"the async invocation did not finish:\n{result}"
        time.sleep(0.2)
    assert "async marker 21" in result.stdout

    result = nimbus("invocations", "cli-async", "--json")
    (record,) = result.json()["invocations"]
    assert record["invocation_id"] == invocation and record["mode"] == "async" and record["output"] == {"n": 42}

    second = nimbus("invoke", "cli-async", "--async", "--data", '{"n": 5}').json()["invocation_id"]
    result = nimbus("logs", "--wait", second, timeout=POLL_TIMEOUT_S)
    assert result.code == 0, result
    assert "async marker 5" in result.stdout and ": succeeded" in result.stderr


def test_rm_then_invoke_is_not_found(nimbus, tmp_path):
    _deploy(nimbus, tmp_path, "cli-gone", HELLO)
    assert nimbus("invoke", "cli-gone").code == 0
    result = nimbus("rm", "cli-gone")
    assert result.code == 0, result
    assert result.stdout.strip() == "deleted cli-gone"

    result = nimbus("invoke", "cli-gone")
    assert result.code == 1, result
    assert result.stderr.startswith("error: Not Found:"), result
    assert "cli-gone" in result.stderr
    assert result.stdout == ""

    assert nimbus("get", "cli-gone").code == 1
    assert "cli-gone" not in nimbus("ls").stdout
    result = nimbus("rm", "cli-gone")
    assert result.code == 1 and "error: Not Found" in result.stderr


def test_api_errors_are_one_line(nimbus, tmp_path):
    result = nimbus("deploy", str(_source(tmp_path, "def handler(event:\n")), "--name", "cli-broken",
                    "--runtime", "python3")
    assert result.code == 1, result
    assert "does not compile" in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result

    result = nimbus("deploy", str(_source(tmp_path, HELLO)), "--name", "Not_A_Name", "--runtime", "python3")
    assert result.code == 1, result
    assert "error: " in result.stderr and "name" in result.stderr

    result = nimbus("deploy", str(_source(tmp_path, HELLO)), "--name", "cli-cobol", "--runtime", "cobol")
    assert result.code == 1, result
    assert "unknown runtime 'cobol'" in result.stderr

    result = nimbus("invoke", "cli-never-deployed")
    assert result.code == 1, result
    assert result.stderr.startswith("error: Not Found:"), result

    result = nimbus("logs", "no-such-invocation")
    assert result.code == 1, result
    assert result.stderr.startswith("error: Not Found:"), result
