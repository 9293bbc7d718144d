"""Creating `provided` functions through both APIs (issue 23): each code form is taken or refused with the
right 4xx, and a bootstrap sent as bytes reaches its machine byte for byte. The Runtime API itself is
tested in test_provided_runtime.py; here only what the host decides.
"""

import base64
import hashlib
import io
import stat
import zipfile

import botocore.exceptions
import pytest
from test_api import assert_problem, invoke, unique
from test_lambda_api import ROLE, client_for

pytestmark = pytest.mark.sandbox

# Answers each event with the sha256 of its own file: what the machine was sent, as the machine has it.
# The comment's bytes are not UTF-8, so the API takes the file as a prebuilt executable (code_base64).
SELF_HASH = (b"#!/bin/sh\n# \xff\xfe\x00\x80 not text\nset -eu\n"
             b'API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"\nH=$(mktemp)\n'
             b"SUM=$(sha256sum \"$0\" | cut -d' ' -f1)\n"
             b'while :; do\n  curl -sS -D "$H" -o /dev/null "$API/invocation/next"\n'
             b"  ID=$(grep -i '^lambda-runtime-aws-request-id:' \"$H\" | cut -d: -f2 | tr -d '[:space:]')\n"
             b'  curl -sS -o /dev/null -X POST "$API/invocation/$ID/response" -d "{\\"sum\\": \\"$SUM\\", '
             b'\\"handler\\": \\"$_HANDLER\\", \\"path\\": \\"$0\\"}"\ndone\n')
SCRIPT = "#!/bin/sh\nexit 0\n"


def zip_of(files: dict[str, bytes | str], executable: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((0o755 if name in executable else 0o644) | stat.S_IFREG) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def create(api, **body):
    return api.post("/api/v1/functions", json={"name": unique("prov"), "runtime": "provided", **body})


# ---------------------------------------------------------------- /api/v1


@pytest.mark.parametrize("runtime", ["provided", "provided.al2", "provided.al2023", "Provided.AL2023"])
def test_each_alias_makes_a_provided_function(api, runtime):
    resp = create(api, runtime=runtime, code=SCRIPT)
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert (fn["runtime"], fn["handler"], fn["code_kind"]) == ("provided", "function.handler", "source")


def test_a_binary_bootstrap_runs_as_it_was_sent(api):
    resp = create(api, code_base64=b64(SELF_HASH), handler="bootstrap")
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert (fn["code_kind"], fn["code_size"]) == ("executable", len(SELF_HASH))
    found = invoke(api, fn["name"], {})
    assert found["status"] == "succeeded", found
    assert found["output"] == {"sum": hashlib.sha256(SELF_HASH).hexdigest(), "handler": "bootstrap",
                               "path": "/var/task/bootstrap"}


def test_a_zip_with_a_bootstrap_is_a_package(api):
    resp = create(api, code_base64=b64(zip_of({"bootstrap": SELF_HASH, "lib/x.txt": "x"})), handler="not.used")
    assert resp.status_code == 201, resp.text
    fn = resp.json()
    assert fn["code_kind"] == "zip" and fn["layer_sha256"] is None
    found = invoke(api, fn["name"], {})
    assert found["output"]["sum"] == hashlib.sha256(SELF_HASH).hexdigest(), found  # mode 0644 in the zip
    assert found["output"]["handler"] == "not.used"


def test_a_zip_without_a_bootstrap_is_refused_naming_its_top_level(api):
    resp = create(api, code_base64=b64(zip_of({"src/bootstrap": SCRIPT, "go.mod": "module x\n"})))
    assert_problem(resp, 422, "'bootstrap' at its top level", "go.mod, src/")


def test_a_zip_with_both_manifests_is_refused(api):
    data = zip_of({"bootstrap": SCRIPT, "requirements.txt": "requests\n",
                   "package.json": '{"dependencies": {"left-pad": "1.3.0"}}'}, executable=("bootstrap",))
    assert_problem(create(api, code_base64=b64(data)), 422, "pick one")


@pytest.mark.parametrize("handler", ["-x", "../x", "a b", "a;b", "x" * 129])
def test_unsafe_handlers_are_refused(api, handler):
    resp = create(api, code=SCRIPT, handler=handler)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")


def test_an_empty_bootstrap_is_refused(api):
    assert_problem(create(api, code="\n"), 422, "empty")


def test_switching_a_python_function_to_provided_needs_new_code(api):
    name = unique("prov")
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                               "code": "def handler(e, c):\n    return 1\n"})
    assert resp.status_code == 201, resp.text
    assert_problem(api.put(f"/api/v1/functions/{name}", json={"runtime": "provided.al2023"}), 422, "new code")
    resp = api.put(f"/api/v1/functions/{name}", json={"runtime": "provided.al2023", "code": SCRIPT,
                                                        "handler": "bootstrap"})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["runtime"], resp.json()["handler"]) == ("provided", "bootstrap")
    # The handler rule follows the runtime: module.function again for python3.
    assert_problem(api.put(f"/api/v1/functions/{name}", json={"runtime": "python3", "handler": "bootstrap",
                                                               "code": "def handler(e, c):\n    return 1\n"}),
                   422, "module.function")


# ---------------------------------------------------------------- the Lambda API


@pytest.fixture(scope="module")
def lam(node):
    return client_for(node.url)


def test_lambda_api_creates_reads_lists_and_reconfigures_provided_functions(lam):
    name = unique("prov")
    created = lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                                  Code={"ZipFile": zip_of({"bootstrap": SELF_HASH}, executable=("bootstrap",))})
    assert (created["Runtime"], created["Handler"]) == ("provided", "bootstrap")
    got = lam.get_function(FunctionName=name)["Configuration"]
    assert (got["Runtime"], got["Handler"], got["State"]) == ("provided", "bootstrap", "Active")
    listed = [fn for page in lam.get_paginator("list_functions").paginate() for fn in page["Functions"]
              if fn["FunctionName"] == name]
    assert [fn["Runtime"] for fn in listed] == ["provided"]
    updated = lam.update_function_configuration(FunctionName=name, Runtime="provided.al2", Handler="function.handler")
    assert (updated["Runtime"], updated["Handler"]) == ("provided", "function.handler")
    answer = lam.invoke(FunctionName=name, Payload=b"{}")
    assert "FunctionError" not in answer
    assert answer["Payload"].read().startswith(b'{"sum": "' + hashlib.sha256(SELF_HASH).hexdigest().encode())


def test_lambda_api_refuses_a_provided_zip_without_bootstrap(lam):
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        lam.create_function(FunctionName=unique("prov"), Runtime="provided.al2", Role=ROLE, Handler="bootstrap",
                            Code={"ZipFile": zip_of({"main.sh": SCRIPT})})
    error = caught.value.response["Error"]
    assert error["Code"] == "InvalidParameterValueException", error
    assert "bootstrap" in error["Message"] and "main.sh" in error["Message"]


def test_the_consoles_provided_starter_runs_as_it_is(api):
    from nimbus.console import starters

    resp = create(api, code=starters.starter("provided"), handler=starters.handler("provided"))
    assert resp.status_code == 201, resp.text
    found = invoke(api, resp.json()["name"], {"name": "x"})
    assert found["output"] == {"message": "Hello from a shell bootstrap!", "handler": "function.handler"}, found
    logs = api.get(f"/api/v1/invocations/{found['invocation_id']}").json()["logs"]
    assert "hello called with {" in logs and '"x"' in logs, logs


def test_nimbus_deploy_of_a_folder_with_a_bootstrap(api, node, tmp_path):
    from typer.testing import CliRunner

    from nimbus.cli import app

    (tmp_path / "bootstrap").write_bytes(SELF_HASH)
    (tmp_path / "bootstrap").chmod(0o755)
    (tmp_path / "data.txt").write_text("x")
    name = unique("prov")
    result = CliRunner().invoke(app, ["deploy", str(tmp_path), "--name", name, "--runtime", "provided.al2023",
                                      "--handler", "bootstrap", "--url", node.url])
    assert result.exit_code == 0, result.output
    fn = api.get(f"/api/v1/functions/{name}").json()
    assert (fn["runtime"], fn["code_kind"], fn["handler"]) == ("provided", "zip", "bootstrap")
    assert invoke(api, name, {})["output"]["sum"] == hashlib.sha256(SELF_HASH).hexdigest()


def test_provided_blank_machines_are_pre_warmed_and_taken(make_node, tmp_path):
    import time

    # Eager function templates: provided versions must not get one (the bootstrap is a process of its own,
    # which a fork would not carry), per-call ones included; they start as any machine does.
    with make_node(tmp_path / "home", f"sqlite:///{tmp_path / 'n.db'}", runtimes="provided.al2023",
                   min_warm=1, function_templates="eager") as running, running.client() as client:
        assert running.settings.runtimes == ["provided"]
        deadline = time.monotonic() + 60
        while running.node.pool.stats().get("provided", {}).get("blank", 0) < 1:
            assert time.monotonic() < deadline, running.node.pool.stats()
            time.sleep(0.05)
        resp = create(client, code_base64=b64(SELF_HASH))
        assert resp.status_code == 201, resp.text
        first = invoke(client, resp.json()["name"], {})
        again = invoke(client, resp.json()["name"], {})
        assert (first["start"], again["start"]) == ("warm", "hot"), (first, again)
        resp = create(client, code_base64=b64(SELF_HASH), isolation="per-call")
        assert resp.status_code == 201, resp.text
        starts = [invoke(client, resp.json()["name"], {})["start"] for _ in range(2)]
        assert "hot" not in starts and "forked" not in starts, starts
        assert running.node.pool.stats()["provided"].get("templates", 0) == 0
