"""``nimbus up --processes 2``: two worker processes, each a whole node, on one port and one SQLite store."""

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from waiting import free_port, stop, wait_until

NIMBUS = Path(sys.executable).with_name("nimbus")
UID_BASE, UID_COUNT = 0x70000000, 65536
ECHO = "def handler(event, context):\n    return event\n"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def machine_uids(worker: int) -> set[int]:
    """The host uids the processes below ``worker`` run as, root's left out."""
    uids = set()
    for pid in descendants(worker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid != 0:
            uids.add(uid)
    return uids


class Supervised:
    """``nimbus up --processes 2`` as a child process on a free port, with a home of its own."""

    def __init__(self, home: Path, **settings) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        env.update({"NIMBUS_RUNTIMES": "python3", "NIMBUS_FUNCTION_TEMPLATES": "off", "NIMBUS_LOG_LEVEL": "info",
                    "NIMBUS_MACHINE_UID_BASE": str(UID_BASE), "NIMBUS_MACHINE_UID_COUNT": str(UID_COUNT)})
        env.update({f"NIMBUS_{key.upper()}": str(value) for key, value in settings.items()})
        self.log_path = home / f"node-{self.port}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(NIMBUS), "up", "--processes", "2", "--home", str(home), "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Supervised":
        try:
            wait_until(lambda: len(self.workers()) == 2, 120, "both workers answering")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def health(self) -> dict | None:
        """/health over a new connection (None when nobody answers)."""
        assert self.proc.poll() is None, f"the supervisor exited: {self.output()}"
        try:
            response = httpx.get(f"{self.url}/health", timeout=5, headers={"connection": "close"})
        except httpx.HTTPError:
            return None
        return response.json()["process"] if response.status_code == 200 else None

    def workers(self, tries: int = 40) -> dict[int, int]:
        """index → pid of the workers that answered ``tries`` new connections."""
        seen = {}
        for _ in range(tries):
            process = self.health()
            if process is not None:
                seen[process["index"]] = process["pid"]
            if len(seen) == 2:
                break
        return seen

    @contextlib.contextmanager
    def client_of(self, index: int) -> Iterator[httpx.Client]:
        """A kept-alive connection that worker ``index`` accepted."""
        for _ in range(200):
            with httpx.Client(base_url=self.url, timeout=60) as client:
                if client.get("/health").json()["process"]["index"] == index:
                    yield client
                    return
        raise AssertionError(f"no connection reached worker {index}")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with Supervised(tmp_path_factory.mktemp("home")) as running:
        yield running


def test_both_workers_answer_on_one_port(node):
    seen = {}
    for _ in range(100):
        process = node.health()
        seen.setdefault(process["index"], set()).add(process["pid"])
    assert sorted(seen) == [0, 1], seen
    assert all(len(pids) == 1 for pids in seen.values()), seen
    assert seen[0] != seen[1]
    assert node.proc.pid not in seen[0] | seen[1]  # the supervisor serves nothing itself


def test_a_function_made_through_one_worker_runs_through_the_other(node):
    with node.client_of(0) as first, node.client_of(1) as second:
        assert first.post("/api/v1/functions", json={"name": "made-on-0", "runtime": "python3",
                                                     "code": ECHO}).status_code == 201
        for i in range(3):
            for client in (first, second):
                resp = client.post("/api/v1/functions/made-on-0/invoke", json={"i": i})
                assert resp.status_code == 200 and resp.json()["output"] == {"i": i}, resp.text


def test_the_workers_machines_have_disjoint_uids(node):
    with node.client_of(0) as first, node.client_of(1) as second:
        first.post("/api/v1/functions", json={"name": "uids", "runtime": "python3", "code": ECHO})
        for client in (first, second):
            assert client.post("/api/v1/functions/uids/invoke", json={}).status_code == 200
        pids = {client.get("/health").json()["process"]["index"]: client.get("/health").json()["process"]["pid"]
                for client in (first, second)}
    uids = {index: machine_uids(pid) for index, pid in pids.items()}
    assert uids[0] and uids[1], uids
    assert not uids[0] & uids[1], uids
    half = UID_COUNT // 2
    assert all(UID_BASE <= uid < UID_BASE + half for uid in uids[0]), uids
    assert all(UID_BASE + half <= uid < UID_BASE + UID_COUNT for uid in uids[1]), uids


def listening_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def test_no_machine_holds_the_listening_socket_or_the_supervisors_pipes(node):
    with node.client_of(0) as first, node.client_of(1) as second:
        first.post("/api/v1/functions", json={"name": "fds", "runtime": "python3", "code": ECHO})
        for client in (first, second):
            assert client.post("/api/v1/functions/fds/invoke", json={}).status_code == 200
    workers = node.workers()
    held = {f"socket:[{listening_inode(node.port)}]"}
    held |= {os.readlink(f"/proc/{node.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{node.proc.pid}/fd")
             if os.readlink(f"/proc/{node.proc.pid}/fd/{fd}").startswith("pipe:")}
    leaks = {}
    for worker in workers.values():
        machines = descendants(worker)
        assert machines
        for pid in machines:
            try:
                targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            except OSError:
                continue
            if targets & held:
                leaks[pid] = targets & held
    assert not leaks, leaks


def test_async_invocations_run_once_each(node):
    with httpx.Client(base_url=node.url, timeout=60) as client:
        code = "import time\ndef handler(event, context):\n    time.sleep(0.05)\n    return event['n']\n"
        assert client.post("/api/v1/functions", json={"name": "once", "runtime": "python3", "code": code,
                                                      "concurrency": 8}).status_code == 201

    def post(n: int) -> tuple[str, int]:
        # A new connection each: the calls are queued through both workers, and both claim.
        resp = httpx.post(f"{node.url}/api/v1/functions/once/async", json={"n": n}, timeout=60,
                          headers={"connection": "close"})
        assert resp.status_code == 202, resp.text
        return resp.json()["invocation_id"], n

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        queued = dict(pool.map(post, range(20)))
    assert len(queued) == 20

    def finished() -> list[dict] | None:
        views = [httpx.get(f"{node.url}/api/v1/invocations/{id_}", timeout=30).json() for id_ in queued]
        return views if all(v["status"] not in ("queued", "running") for v in views) else None

    views = wait_until(finished, 90, "every async call finished")
    for view in views:
        assert view["status"] == "succeeded", view
        assert view["output"] == queued[view["invocation_id"]]
        assert view["attempts"] == 1, view  # a second claim of the same row would count a second attempt
    listed = httpx.get(f"{node.url}/api/v1/functions/once/invocations", params={"limit": 100}, timeout=30).json()
    assert sorted(inv["invocation_id"] for inv in listed["invocations"]) == sorted(queued)


def test_a_killed_worker_is_restarted_and_the_node_keeps_answering(node):
    before = node.workers()
    os.kill(before[1], signal.SIGKILL)
    wait_until(lambda: not alive(before[1]), 30, "the worker gone")
    # Meanwhile worker 0 serves every new connection.
    for _ in range(10):
        resp = httpx.get(f"{node.url}/health", timeout=10, headers={"connection": "close"})
        assert resp.status_code == 200
    def restarted() -> dict[int, int] | None:
        seen = node.workers()
        return seen if seen.get(1, before[1]) != before[1] else None

    after = wait_until(restarted, 120, "worker 1 restarted")
    assert after[0] == before[0]
    with node.client_of(1) as client:
        client.post("/api/v1/functions", json={"name": "after-restart", "runtime": "python3", "code": ECHO})
        assert client.post("/api/v1/functions/after-restart/invoke", json={"x": 1}).json()["output"] == {"x": 1}
    assert "worker 1 (pid" in node.output() and "restarting it" in node.output()


def test_sigterm_stops_every_worker_with_status_0(tmp_path):
    with Supervised(tmp_path) as running:
        workers = running.workers()
        machines = [pid for worker in workers.values() for pid in descendants(worker)]
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(60) == 0, running.output()
        assert not [pid for pid in [*workers.values(), *machines] if alive(pid)]
        assert "all worker processes stopped" in running.output()


def test_the_workers_stop_when_the_supervisor_is_killed(tmp_path):
    with Supervised(tmp_path) as running:
        workers = running.workers()
        running.proc.kill()
        running.proc.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in workers.values()), 60, "the workers gone")


def test_a_node_that_cannot_start_exits_with_status_3(tmp_path):
    (tmp_path / "not-a-database").mkdir()
    proc = subprocess.run(
        [str(NIMBUS), "up", "--processes", "2", "--home", str(tmp_path), "--port", str(free_port()),
         "--database-url", f"sqlite:///{tmp_path / 'not-a-database'}"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}, "NIMBUS_RUNTIMES": "python3"},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
