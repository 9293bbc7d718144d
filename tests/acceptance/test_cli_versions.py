"""``nimbus publish``, ``versions``, ``alias set/ls/rm`` and ``invoke NAME:QUALIFIER`` against a real node."""

import textwrap
import uuid

TAGGED = textwrap.dedent("""\
    def handler(event, context):
        return {"version": context.function_version, "tag": "%s"}
""")


def _deploy(nimbus, tmp_path, name: str, tag: str) -> None:
    path = tmp_path / "main.py"
    path.write_text(TAGGED % tag)
    result = nimbus("deploy", str(path), "--name", name, "--runtime", "python3")
    assert result.code == 0, result


def test_publish_alias_and_invoke_a_qualifier(nimbus, tmp_path):
    name = f"cli-ver-{uuid.uuid4().hex[:8]}"
    _deploy(nimbus, tmp_path, name, "a")
    result = nimbus("publish", name, "--description", "first")
    assert result.code == 0 and f"published {name} version 1" in result.stdout, result
    result = nimbus("publish", name)
    assert result.code == 0 and "already published" in result.stdout, result
    _deploy(nimbus, tmp_path, name, "b")
    assert nimbus("publish", name).code == 0

    result = nimbus("alias", "set", name, "prod", "1", "--weight", "2=0.25")
    assert result.code == 0 and f"created {name}:prod -> version 1, 25% to 2" in result.stdout, result
    result = nimbus("versions", name)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "REVISION"] and "prod" in lines[1] and "prod (25%)" in lines[2]
    result = nimbus("alias", "set", name, "prod", "2")  # no --weight: all of prod to 2
    assert result.code == 0 and f"updated {name}:prod -> version 2" in result.stdout, result
    result = nimbus("alias", "ls", name, "--json")
    assert [(a["name"], a["version"], a["additional"]) for a in result.json()["aliases"]] == [("prod", "2", {})]

    for qualifier, (version, tag) in {"prod": ("2", "b"), "1": ("1", "a"), "$LATEST": ("$LATEST", "b")}.items():
        result = nimbus("invoke", f"{name}:{qualifier}")
        assert result.code == 0, result
        body = result.json()
        assert (body["executed_version"], body["output"]) == (version, {"version": version, "tag": tag})

    result = nimbus("alias", "set", name, "bad", "1", "--weight", "2")
    assert result.code == 2 and "VERSION=WEIGHT" in result.stderr, result
    result = nimbus("alias", "set", name, "9digits", "7")
    assert result.code == 1 and "version 7" in result.stderr, result
    result = nimbus("invoke", f"{name}:nope")
    assert result.code == 1 and "alias 'nope'" in result.stderr, result
    assert nimbus("alias", "rm", name, "prod").code == 0
    result = nimbus("alias", "ls", name)
    assert result.code == 0 and "no aliases" in result.stderr, result
