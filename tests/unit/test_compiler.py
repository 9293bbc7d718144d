"""The compiler's bookkeeping (cache key, cache hits, single flight, slots, error wording), the docker builder's
exact commands and engine detection, against fakes.

The fake builder below stands in for a sandbox only here, where the subject is what the compiler does
around a build; tests/integration/test_builder.py runs real toolchains in real sandboxes. The docker
builder's runner is a recorder because no container engine can run on these machines.
"""

import asyncio
import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from nimbus import compiler
from nimbus.compiler import recipes
from nimbus.compiler.base import OUTPUT_MAX, Build, BuildFailed, Job, JobResult, Toolchain, clip
from nimbus.compiler.docker import DockerBuilder, engine_candidates, find_engine, probe_engine
from nimbus.compiler.process import Exit
from nimbus.errors import InvalidRequest, NotFound, Unavailable

RUST_OK = b'fn main() { println!("hi"); }\n'


class FakeBuilder:
    """Counts jobs; each "builds" by hashing the source, after an optional gate; can be told to fail."""

    name = "fake"

    def __init__(self, *, version: str = "rustc 9.9.9 (fake)", result: JobResult | None = None) -> None:
        self.version = version
        self.result = result
        self.runs: list[Job] = []
        self.running = 0
        self.max_running = 0
        self.gate: asyncio.Event | None = None
        self.closed = False

    def available(self) -> tuple[bool, str]:
        return True, "fake"

    async def toolchain(self, tool: str) -> Toolchain:
        return Toolchain(tool, self.version)

    async def run(self, job: Job) -> JobResult:
        self.runs.append(job)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0.01)
            if self.result is not None:
                return self.result
            source = dict(job.files)[job.user_file]
            return JobResult(status=0, output="", artifact=b"\x7fELF" + hashlib.sha256(source).digest())
        finally:
            self.running -= 1

    async def close(self) -> None:
        self.closed = True


def make(builder=None, **kwargs):
    builder = builder or FakeBuilder()
    return compiler.Compiler(builder, compiler.MemoryCache(), **kwargs), builder


# ---------------------------------------------------------------- cache key


def test_cache_key_is_sha256_of_runtime_toolchain_and_source():
    key = compiler.cache_key("go", "go1.19.8 linux/amd64", b"package main\n")
    assert key == hashlib.sha256(b"go\0go1.19.8 linux/amd64\0package main\n").hexdigest()
    assert key == compiler.cache_key("go", "go1.19.8 linux/amd64", b"package main\n")
    others = {
        compiler.cache_key("rust", "go1.19.8 linux/amd64", b"package main\n"),
        compiler.cache_key("go", "go1.19.9 linux/amd64", b"package main\n"),
        compiler.cache_key("go", "go1.19.8 linux/amd64", b"package main\n\n"),
    }
    assert key not in others and len(others) == 3
    # The separators make it unambiguous where one part ends and the next begins.
    assert compiler.cache_key("go", "1", b"x") != compiler.cache_key("go1", "", b"x")


def test_recipe_fingerprint_covers_the_generated_main_but_not_the_user_source():
    a = recipes.go(b"package main // a\n", 60, main=b"package main // main v1\n")
    b = recipes.go(b"package main // b\n", 60, main=b"package main // main v1\n")
    c = recipes.go(b"package main // a\n", 60, main=b"package main // main v2\n")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert recipes.rust(b"x", 60).fingerprint() != recipes.rust(b"x", 60, target="wasm32-wasip1").fingerprint()


def test_go_recipe_is_the_documented_build():
    job = recipes.go(b"package main\n", 60, main=b"package main\nfunc main() {}\n")
    assert job.tool == "go"
    assert job.args == ("build", "-trimpath", "-ldflags=-s -w", "-o", "/build/out/bootstrap", ".")
    env = dict(job.env)
    assert env["CGO_ENABLED"] == "0" and env["GOPROXY"] == "off" and env["GOTOOLCHAIN"] == "local"
    assert env["GOFLAGS"] == "-mod=mod" and env["HOME"] == "/tmp" and env["GOPATH"].startswith("/tmp/")
    files = dict(job.files)
    assert files["go.mod"] == b"module nimbus.function\n\ngo 1.19\n"
    assert files["function.go"] == b"package main\n" and files["nimbus_main.go"].startswith(b"package main")
    assert job.artifact == "bootstrap" and job.go_cache


def test_wasm_kinds():
    assert recipes.wasm_kind(b"\0asm\x01\0\0\0") == "module"
    assert recipes.wasm_kind(b"  \n(module)") == "wat"
    assert recipes.wasm_kind(b";; a comment\n(module)") == "wat"
    assert recipes.wasm_kind(b"fn main() {}") == "rust"


# ---------------------------------------------------------------- cache and single flight


async def test_cache_hit_does_no_build():
    comp, builder = make()
    first = await comp.build("rust", RUST_OK)
    second = await comp.build("rust", RUST_OK)
    assert len(builder.runs) == 1
    assert first.cached is False and second.cached is True
    assert second.artifact == first.artifact and second.key == first.key
    assert first.artifact_sha256 == hashlib.sha256(first.artifact).hexdigest()
    assert first.source_sha256 == hashlib.sha256(RUST_OK).hexdigest()
    assert first.toolchain.startswith("rustc 9.9.9 (fake) (recipe ")
    await comp.build("rust", RUST_OK + b"\n")  # other source: a build
    assert len(builder.runs) == 2


async def test_f10_a_compiled_build_cache_hit_does_not_tell_another_tenant():
    """Security review F10: the artifact is shared, the fact that another tenant built it is not."""
    builder = FakeBuilder()
    comp = compiler.Compiler(builder, compiler.MemoryCache())
    try:
        first = await comp.build("rust", RUST_OK, tenant="a")
        other = await comp.build("rust", RUST_OK, tenant="b")
        again = await comp.build("rust", RUST_OK, tenant="b")
        mine = await comp.build("rust", RUST_OK, tenant="a")
    finally:
        await comp.close()
    assert len(builder.runs) == 1 and first.artifact == other.artifact == again.artifact
    assert first.cached is False and other.cached is False
    assert again.cached is True and again.duration_ms == other.duration_ms
    assert mine.cached is True and mine.duration_ms == first.duration_ms


async def test_a_new_toolchain_is_a_new_build():
    comp, builder = make()
    await comp.build("rust", RUST_OK)
    builder.version = "rustc 10.0.0 (fake)"
    rebuilt = await comp.build("rust", RUST_OK)
    assert rebuilt.cached is False and len(builder.runs) == 2


async def test_identical_concurrent_builds_are_single_flighted():
    comp, builder = make(concurrency=4)
    builder.gate = asyncio.Event()
    calls = [asyncio.create_task(comp.build("rust", RUST_OK)) for _ in range(5)]
    other = asyncio.create_task(comp.build("rust", RUST_OK + b"// other\n"))
    while len(builder.runs) < 2:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # give any duplicate a chance to start
    assert len(builder.runs) == 2
    builder.gate.set()
    builds = await asyncio.gather(*calls)
    await other
    assert len(builder.runs) == 2
    assert sorted(b.cached for b in builds) == [False, True, True, True, True]
    assert len({b.artifact for b in builds}) == 1


async def test_a_cancelled_requester_does_not_kill_the_build_others_wait_for():
    comp, builder = make()
    builder.gate = asyncio.Event()
    first = asyncio.create_task(comp.build("rust", RUST_OK))
    second = asyncio.create_task(comp.build("rust", RUST_OK))
    while not builder.runs:
        await asyncio.sleep(0.005)
    first.cancel()
    builder.gate.set()
    build = await second
    assert build.artifact.startswith(b"\x7fELF")
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await comp.build("rust", RUST_OK)).cached is True
    assert len(builder.runs) == 1


async def test_builds_are_limited_to_the_concurrency():
    for concurrency in (1, 2):
        comp, builder = make(concurrency=concurrency)
        await asyncio.gather(*(comp.build("rust", RUST_OK + b"//%d" % i) for i in range(4)))
        assert len(builder.runs) == 4 and builder.max_running == concurrency


async def test_close_cancels_running_builds_and_closes_the_builder():
    comp, builder = make()
    builder.gate = asyncio.Event()  # never set: the build hangs until cancelled
    waiting = asyncio.create_task(comp.build("rust", RUST_OK))
    while not builder.runs:
        await asyncio.sleep(0.005)
    await comp.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await waiting
    assert builder.closed and builder.running == 0
    with pytest.raises(Unavailable, match="shut down"):
        await comp.build("rust", RUST_OK)


# ---------------------------------------------------------------- failures


async def test_compile_error_is_build_failed_with_the_output():
    output = "error[E0425]: cannot find value `nope` in this scope\n --> src/main.rs:1:13\n"
    comp, builder = make(FakeBuilder(result=JobResult(status=1, output=output)))
    with pytest.raises(BuildFailed) as info:
        await comp.build("rust", b"fn main() { nope; }")
    exc = info.value
    assert isinstance(exc, InvalidRequest)  # the API's 422
    assert str(exc).startswith("the rust build failed (exit status 1):\n")
    assert "cannot find value `nope`" in str(exc) and exc.output == output and exc.timed_out is False
    with pytest.raises(BuildFailed):  # failures are not cached: it runs again
        await comp.build("rust", b"fn main() { nope; }")
    assert len(builder.runs) == 2


async def test_timeout_is_build_failed_saying_so():
    result = JobResult(status=None, output="compiling...\n", timed_out=True)
    comp, _ = make(FakeBuilder(result=result), timeout_s=5)
    with pytest.raises(BuildFailed) as info:
        await comp.build("rust", RUST_OK)
    assert info.value.timed_out is True
    assert str(info.value).startswith("the rust build ran past its 5 s limit and was killed")


async def test_a_build_with_no_artifact_and_a_memory_kill_say_so():
    comp, _ = make(FakeBuilder(result=JobResult(status=0, output="", note="left no regular file bootstrap")))
    with pytest.raises(BuildFailed, match="produced no artifact.*left no regular file"):
        await comp.build("rust", RUST_OK)
    oom = JobResult(status=137, output="", note="the build hit its memory limit (2048 MiB)")
    comp, _ = make(FakeBuilder(result=oom))
    with pytest.raises(BuildFailed, match=r"exit status 137; the build hit its memory limit \(2048 MiB\)"):
        await comp.build("rust", RUST_OK)


def test_build_failed_output_keeps_head_and_tail():
    lines = [f"line {i:06d} " + "x" * 80 for i in range(2000)]
    exc = BuildFailed("the go build failed", "\n".join(lines))
    assert lines[0] in exc.output and lines[-1] in exc.output
    assert lines[1000] not in exc.output and "bytes of output cut" in exc.output
    assert len(exc.output.encode()) <= OUTPUT_MAX + 100
    assert str(exc) == f"the go build failed:\n{exc.output.strip()}"
    assert str(BuildFailed("no output")) == "no output"
    assert clip("short") == "short"


async def test_uncompiled_runtimes_are_refused():
    comp, builder = make()
    assert [r for r in ("go", "rust", "wasm", "python3", "nodejs") if comp.compiles(r)] == ["go", "rust", "wasm"]
    with pytest.raises(InvalidRequest, match="not compiled"):
        await comp.build("python3", b"x = 1")
    assert await comp.toolchain("rust") == "rustc 9.9.9 (fake)"
    assert (await comp.toolchain("wasm")).startswith("wasmtime ")
    assert not builder.runs


async def test_rust_to_wasm_without_the_target_says_how_to_get_it():
    comp, builder = make()
    with pytest.raises(BuildFailed) as info:
        await comp.build("wasm", b"fn main() {}")
    text = str(info.value)
    assert "wasm32-wasip1" in text and "rustup target add wasm32-wasip1" in text and "code_base64" in text
    assert not builder.runs


# ---------------------------------------------------------------- caches


class FakeStore:
    """The four store methods StoreCache uses, kept in dicts (the real ones are tested against databases)."""

    def __init__(self) -> None:
        self.builds: dict[str, object] = {}
        self.code: dict[str, bytes] = {}
        self.claims: dict[tuple[str, str], float] = {}

    async def claim_build(self, key, tenant, duration_ms):
        if (key, tenant) in self.claims:
            return self.claims[key, tenant]
        self.claims[key, tenant] = duration_ms
        return None

    async def get_build(self, key):
        return self.builds.get(key)

    async def get_code(self, sha):
        if sha not in self.code:
            raise NotFound(sha)
        return self.code[sha]

    async def put_build(self, *, key, runtime, toolchain, source_sha256, artifact, log, duration_ms, kind="artifact"):
        from nimbus.store.records import BuildRecord, utcnow

        if key not in self.builds:
            sha = hashlib.sha256(artifact).hexdigest()
            self.code[sha] = artifact
            self.builds[key] = BuildRecord(key=key, runtime=runtime, toolchain=toolchain, source_sha256=source_sha256,
                                           artifact_sha256=sha, artifact_size=len(artifact), log=log,
                                           duration_ms=duration_ms, created_at=utcnow(), kind=kind)
        return self.builds[key]


async def test_store_cache_round_trip_and_missing_artifact():
    store = FakeStore()
    comp = compiler.Compiler(FakeBuilder(), compiler.StoreCache(store))
    built = await comp.build("rust", RUST_OK)
    hit = await compiler.StoreCache(store).get(built.key)
    assert hit is not None and hit.cached is True and hit.artifact == built.artifact
    assert (hit.toolchain, hit.source_sha256, hit.runtime) == (built.toolchain, built.source_sha256, "rust")
    store.code.clear()  # the row outlived its bytes: a miss, so the next deploy rebuilds and stores them again
    assert await compiler.StoreCache(store).get(built.key) is None


async def test_store_cache_hands_out_the_stored_artifact_when_another_build_won():
    store = FakeStore()
    cache = compiler.StoreCache(store)
    ours = Build(key="a" * 64, runtime="go", toolchain="t", artifact=b"ours",
                 artifact_sha256=hashlib.sha256(b"ours").hexdigest(), log="", duration_ms=1.0, cached=False,
                 source_sha256="b" * 64)
    winner = Build(key="a" * 64, runtime="go", toolchain="t", artifact=b"theirs",
                   artifact_sha256=hashlib.sha256(b"theirs").hexdigest(), log="w", duration_ms=2.0, cached=False,
                   source_sha256="b" * 64)
    assert await cache.put(winner) is None
    stored = await cache.put(ours)
    assert stored.artifact == b"theirs" and stored.artifact_sha256 == winner.artifact_sha256


async def test_memory_cache_is_bounded():
    cache = compiler.MemoryCache(max_entries=2)
    for i in range(3):
        await cache.put(Build(key=str(i), runtime="go", toolchain="t", artifact=b"x", artifact_sha256="s", log="",
                              duration_ms=0, cached=False))
    assert len(cache) == 2 and await cache.get("0") is None and (await cache.get("2")).cached is True


# ---------------------------------------------------------------- registry


def test_load_builder_by_name(tmp_path):
    assert compiler.load_builder("sandbox", tmp_path).name == "sandbox"
    docker = compiler.load_builder("docker", tmp_path, memory_mb=512, images={"go": "golang:1.22"})
    assert docker.name == "docker" and docker.memory_mb == 512
    assert docker.images == {"go": "golang:1.22", "rust": "rust:1.95"}
    with pytest.raises(ValueError, match="unknown builder 'kaniko'"):
        compiler.load_builder("kaniko", tmp_path)
    comp = compiler.create_compiler(tmp_path, builder="docker", timeout_s=12, concurrency=2)
    assert comp.builder.name == "docker" and comp.timeout_s == 12 and comp.concurrency == 2
    assert isinstance(comp.cache, compiler.MemoryCache)


# ---------------------------------------------------------------- docker builder


class Listener:
    """A Unix socket that accepts connections: a stand-in engine endpoint for detection only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def engine(tmp_path):
    listener = Listener(tmp_path / "docker.sock")
    yield f"unix://{listener.path}"
    listener.close()


class Recorder:
    """Records each CLI command; ``docker run`` of a build writes an artifact into the mounted out dir."""

    def __init__(self, *, outputs: dict[str, bytes] | None = None, timed_out: bool = False) -> None:
        self.commands: list[list[str]] = []
        self.envs: list[dict] = []
        self.outputs = outputs or {}
        self.timed_out = timed_out

    async def __call__(self, argv, *, env, timeout_s):
        self.commands.append(list(argv))
        self.envs.append(dict(env))
        if argv[1] == "run" and "--volume" in argv:
            out = next(v for v in argv if v.endswith(":/build/out:rw")).rsplit(":", 2)[0]
            if self.timed_out:
                return Exit(status=None, output=b"compiling\n", timed_out=True, duration_ms=1.0)
            for name in ("bootstrap",):
                Path(out, name).write_bytes(b"\x7fELF built in a container")
            return Exit(status=0, output=b"", timed_out=False, duration_ms=5.0)
        script = argv[-1]
        text = self.outputs.get(script, b"")
        return Exit(status=0, output=text, timed_out=False, duration_ms=1.0)


def _expected_run(home: Path, name: str, image: str, job: Job, *, memory="2048m", cpus="1", cpu_s=61) -> list[str]:
    ws = home.resolve() / "builds" / name.removeprefix("nimbus-build-")
    argv = ["docker", "run", "--rm", "--name", name, "--network", "none", "--user", "65534:65534",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--read-only",
            "--tmpfs", f"/tmp:rw,exec,nosuid,nodev,size={memory},mode=1777",
            "--memory", memory, "--memory-swap", memory, "--pids-limit", "1024", "--cpus", cpus,
            "--ulimit", f"cpu={cpu_s}:{cpu_s}", "--ulimit", f"fsize={1 << 30}:{1 << 30}", "--ulimit", "core=0:0",
            "--volume", f"{ws}/src:/build/src:rw", "--volume", f"{ws}/out:/build/out:rw", "--workdir", "/build/src"]
    for key, value in job.env:
        argv += ["--env", f"{key}={value}"]
    return argv + ["--entrypoint", job.tool, image, *job.args]


async def test_docker_builder_runs_the_go_build_with_these_exact_commands(tmp_path, engine):
    runner = Recorder(outputs={"go version": b"go version go1.19.13 linux/amd64\n"})
    builder = DockerBuilder(tmp_path, cli="docker", engine=engine, runner=runner, cpus=1.0, timeout_s=60)
    comp = compiler.Compiler(builder, compiler.MemoryCache(), timeout_s=60)
    build = await comp.build("go", b"package main\n")
    assert build.artifact == b"\x7fELF built in a container"
    assert build.toolchain.startswith("go1.19.13 linux/amd64 (recipe ")
    query, run = runner.commands
    assert query == ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", "golang:1.19", "-c",
                     "go version"]
    name = run[run.index("--name") + 1]
    assert name.startswith("nimbus-build-")
    job = recipes.go(b"package main\n", 60)
    assert run == _expected_run(tmp_path, name, "golang:1.19", job)
    assert run[-9:] == ["--entrypoint", "go", "golang:1.19", "build", "-trimpath", "-ldflags=-s -w", "-o",
                        "/build/out/bootstrap", "."]
    assert ["--env", "GOPROXY=off"] == run[run.index("GOPROXY=off") - 1: run.index("GOPROXY=off") + 1]
    assert runner.envs[1]["DOCKER_HOST"] == engine
    assert not (tmp_path / "builds").exists() or not any((tmp_path / "builds").iterdir())  # cleaned up
    await comp.build("go", b"package main\n")
    assert len(runner.commands) == 2  # cached: neither a query nor a run


async def test_docker_builder_runs_the_rust_build_with_these_exact_commands(tmp_path, engine):
    script = 'rustc --version && ls "$(rustc --print sysroot)/lib/rustlib"'
    runner = Recorder(outputs={script: b"rustc 1.95.0 (59807616e 2026-04-14)\netc\nx86_64-unknown-linux-gnu\n"})
    builder = DockerBuilder(tmp_path, cli="docker", engine=engine, runner=runner, cpus=1.5, memory_mb=1024,
                            images={"rust": "registry.local/rust:1.95"}, timeout_s=90)
    comp = compiler.Compiler(builder, compiler.MemoryCache(), timeout_s=90)
    await comp.build("rust", RUST_OK)
    query, run = runner.commands
    assert query == ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", "registry.local/rust:1.95",
                     "-c", script]
    name = run[run.index("--name") + 1]
    expected = _expected_run(tmp_path, name, "registry.local/rust:1.95", recipes.rust(RUST_OK, 90), memory="1024m",
                             cpus="1.5", cpu_s=91)
    assert run == expected
    assert run[-18:] == ["--entrypoint", "rustc", "registry.local/rust:1.95", "--edition", "2021", "--crate-type",
                         "bin", "--crate-name", "function", "-C", "opt-level=3", "-C", "debuginfo=0", "-C",
                         "strip=symbols", "-o", "/build/out/bootstrap", "main.rs"]
    tc = await builder.toolchain("rustc")
    assert tc.targets == frozenset({"etc", "x86_64-unknown-linux-gnu"})


async def test_docker_builder_kills_the_container_at_the_time_limit(tmp_path, engine):
    runner = Recorder(outputs={"go version": b"go version go1.19.13 linux/amd64\n"}, timed_out=True)
    builder = DockerBuilder(tmp_path, cli="docker", engine=engine, runner=runner)
    comp = compiler.Compiler(builder, compiler.MemoryCache(), timeout_s=3)
    with pytest.raises(BuildFailed) as info:
        await comp.build("go", b"package main\n")
    assert info.value.timed_out
    run, kill = runner.commands[1:]
    assert kill == ["docker", "kill", run[run.index("--name") + 1]]


async def test_docker_builder_without_an_engine_says_so(tmp_path):
    runner = Recorder()
    builder = DockerBuilder(tmp_path, cli="docker", engine=f"unix://{tmp_path}/nothing.sock", runner=runner)
    ok, why = builder.available()
    assert not ok and "no engine socket answers" in why and "nothing.sock" in why
    comp = compiler.Compiler(builder, compiler.MemoryCache())
    with pytest.raises(BuildFailed, match="cannot reach a Docker or Podman engine"):
        await comp.build("go", b"package main\n")
    assert runner.commands == []  # nothing was run against an engine that is not there


# ---------------------------------------------------------------- engine detection


def test_engine_candidates_follow_docker_host_then_the_usual_sockets():
    env = {"DOCKER_HOST": "tcp://10.0.0.1:2375", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert engine_candidates(env) == ["tcp://10.0.0.1:2375", "unix:///var/run/docker.sock",
                                      "unix:///run/podman/podman.sock", "unix:///run/user/1000/podman/podman.sock"]
    assert engine_candidates({}) == ["unix:///var/run/docker.sock", "unix:///run/podman/podman.sock"]


def test_engine_detection_connects_to_the_socket(tmp_path, engine):
    assert probe_engine(engine).reachable
    # A socket file nobody listens on any more is not an engine, however it looks on disk.
    stale = Listener(tmp_path / "stale.sock")
    stale.close()
    assert (tmp_path / "stale.sock").exists()
    dead = probe_engine(f"unix://{tmp_path}/stale.sock")
    assert not dead.reachable and "refused" in dead.detail.lower()
    assert not probe_engine(f"unix://{tmp_path}/absent.sock").reachable
    assert not probe_engine("ssh://somewhere").reachable
    found, probes = find_engine(candidates=[f"unix://{tmp_path}/stale.sock", engine])
    assert found is not None and found.address == engine and len(probes) == 2
    found, _ = find_engine(env={"DOCKER_HOST": engine})
    assert found is not None and found.address == engine
    assert find_engine(candidates=[f"unix://{tmp_path}/absent.sock"])[0] is None


def test_engine_detection_over_tcp():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
    accepted.start()
    try:
        assert probe_engine(f"tcp://127.0.0.1:{port}").reachable
    finally:
        accepted.join(5)
        server.close()
    assert not probe_engine(f"tcp://127.0.0.1:{port}").reachable


def test_report_shape():
    report = compiler.report(images={"go": "golang:1.22"})
    assert set(report) == {"runtimes", "builders"}
    assert set(report["runtimes"]) == {"go", "rust", "wasm"} and set(report["builders"]) == {"sandbox", "docker"}
    for entry in (*report["runtimes"].values(), *report["builders"].values()):
        assert isinstance(entry["ok"], bool) and entry["detail"]
    assert report["builders"]["docker"]["images"]["go"] == "golang:1.22"
    assert report["runtimes"]["wasm"]["version"].startswith("wasmtime ")
    docker = report["builders"]["docker"]
    assert docker["ok"] == (docker["cli"] is not None and docker["engine"] is not None)
    assert os.path.basename(report["builders"]["sandbox"]["bwrap"] or "bwrap") == "bwrap"
