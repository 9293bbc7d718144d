"""bench/wrk.py, bench/load.py and bench/peer.py: the wrk rows of `make bench` (issue 24), against real wrk."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a directory of the repository, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import load, peer, report, wrk  # noqa: E402

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make bench installs it)")

REPLIES = {"/hot": (200, b'{"status":"succeeded","start":"hot"}'), "/warm": (200, b'{"status":"succeeded","start":"warm"}'),
           "/broken": (500, b'{"error":"no"}')}


class Recorder(BaseHTTPRequestHandler):
    """Answers each path from REPLIES and records what was posted where."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.seen.append((self.path, body))
        status, reply = REPLIES[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def path_without(tmp_path, monkeypatch):
    """PATH of one directory holding only the given programs (links to the real ones)."""

    def make(*programs: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for program in programs:
            (bin_dir / program).symlink_to(shutil.which(program))
        monkeypatch.setenv("PATH", str(bin_dir))

    return make


@needs_wrk
def test_wrk_rotates_paths_posts_the_body_and_counts_starts_and_status_errors(server):
    body = b'{"hello": "world"}'
    result = wrk.run(server, body, 2, 1, paths=["/hot", "/warm", "/broken"], count_starts=True, warmup_s=0)
    assert {path for path, _ in Recorder.seen} == {"/hot", "/warm", "/broken"}
    assert {posted for _, posted in Recorder.seen} == {body}
    assert set(result.starts) == {"hot", "warm", "none"}
    assert sum(result.starts.values()) == result.requests
    assert result.errors["status"] == result.starts["none"] > 0  # the 500s
    assert result.error_count >= result.errors["status"]
    assert 0 < result.p(50) <= result.p(99) <= result.p(99.9) <= result.max_ms
    assert 0 < result.hot_share() < 1


@needs_wrk
def test_wrk_uses_the_url_path_without_paths_and_a_measured_run_counts_nothing(server):
    result = wrk.run(f"{server}/hot", b"{}", 1, 1)  # with its warm-up run
    assert {path for path, _ in Recorder.seen} == {"/hot"}
    assert result.starts == {} and result.hot_share() is None
    assert result.error_count == 0 and result.requests > 0 and result.rps > 0


def test_parse_refuses_output_without_the_done_figures():
    with pytest.raises(RuntimeError, match="printed no"):
        wrk.parse("Running 1s test @ http://127.0.0.1:1/\n  1 threads and 1 connections\n")


def test_tree_cpu_counts_the_cpu_time_of_children():
    burn = "import time\nwhile time.process_time() < 0.3: pass\nprint('done', flush=True)\ntime.sleep(60)"
    before = wrk.tree_cpu_s(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        assert wrk.tree_cpu_s(os.getpid()) - before >= 0.25  # 0.3 s burnt, counted in clock ticks
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_rows_say_wrk_is_missing_without_it(path_without, tmp_path):
    path_without()  # an empty PATH: no wrk
    rows = load.single_function("http://127.0.0.1:1/", "http://127.0.0.1:1/", b"{}", 1)
    rows |= load.processes_rows(tmp_path, 1, b"{}")
    assert set(rows) == {"wrk_p50_ms_c1", "warm_throughput_rps_c32", "warm_p99_ms_c32",
                         "processes_rps_c32_n1", "processes_rps_c32_n2"}
    assert all(r["value"] is None and r["note"] == wrk.MISSING for r in rows.values())
    report.annotate(rows)
    assert rows["warm_p99_ms_c32"]["met"] is None
    assert wrk.MISSING in report.render(rows)


@needs_wrk
def test_peer_row_says_why_when_npm_cannot_install_it(path_without, tmp_path):
    path_without("wrk")  # wrk, but no npm
    found = peer.measure(b"{}", 1, 32, root=tmp_path / "peer")
    assert found == {"available": False, "note": "serverless-offline not measured: npm not found"}
    rows = load.peer_rows({}, found)
    assert [r["value"] for r in rows.values()] == [None, None]
    assert rows["peer_p50_ms_c1"]["note"] == found["note"]


def test_peer_rows_compare_nimbus_with_the_peer_against_the_goals():
    nimbus = {"wrk_p50_ms_c1": {"value": 0.4}, "warm_throughput_rps_c32": {"value": 4000.0},
              "warm_p99_ms_c32": {"value": 20.0}}
    found = {"available": True, "p50_ms_c1": 0.5, "rps": 1000.0, "p50_ms": 20.0, "p99_ms": 300.0, "p999_ms": 400.0,
             "errors": 0, "requests": 5000, "packages": {"serverless": "3.40.0", "serverless-offline": "13.10.1"}}
    rows = load.peer_rows(nimbus, found)
    report.annotate(rows)
    assert rows["peer_throughput_rps_c32"]["ratio"] == 4.0 and rows["peer_throughput_rps_c32"]["met"] is True
    assert rows["peer_p50_ms_c1"]["ratio"] == 0.8 and rows["peer_p50_ms_c1"]["met"] is True
    found["rps"], found["p50_ms_c1"] = 2500.0, 0.3
    rows = load.peer_rows(nimbus, found)
    report.annotate(rows)
    assert rows["peer_throughput_rps_c32"]["met"] is False and rows["peer_p50_ms_c1"]["met"] is False
    assert "serverless-offline (serverless 3.40.0, serverless-offline 13.10.1" in report.details(rows)


def test_processes_rows_say_not_available_when_settings_have_no_processes(monkeypatch):
    import nimbus.config

    assert load.processes_available() is None  # this Nimbus has NIMBUS_PROCESSES

    class OldSettings:
        model_fields = {"home": None, "port": None}

    monkeypatch.setattr(nimbus.config, "Settings", OldSettings)
    assert "no NIMBUS_PROCESSES" in load.processes_available()


def test_details_report_p999_errors_and_the_hot_hit_rate():
    rows = {
        "warm_p99_ms_c32": {"value": 20.0, "errors": 1, "error_kinds": {"status": 1}, "p50_ms": 5.0, "p999_ms": 31.5,
                            "max_ms": 40.0, "requests": 1000, "starts": {"hot": 10}, "echo_p50_ms": 1.0,
                            "echo_p99_ms": 3.0, "echo_p999_ms": 4.0, "echo_errors": 0, "node_cpu_ms_per_call": 0.5,
                            "tool": "wrk -t1 -c32"},
        "processes_rps_c32_n2": {"value": 3000.0, "floor": 2000.0, "ratio": 1.5, "processes": 2, "rps": 3000.0,
                                 "p50_ms": 9.0, "p99_ms": 30.0, "p999_ms": 50.0, "errors": 0, "functions": 50,
                                 "hot_share": 0.955, "starts": {"hot": 955, "warm": 45}, "node_cpu_cores": 1.8,
                                 "node_cpu_ms_per_call": 0.6},
    }
    report.annotate(rows)
    assert rows["warm_p99_ms_c32"]["met"] is False  # an error, though the p99 is under 25 ms
    text = report.details(rows)
    assert "p99.9 31.50 ms" in text and "1 errors {'status': 1}" in text
    assert "NIMBUS_PROCESSES=2" in text and "1.50x the 1-process node" in text and "hot-hit rate 95.5%" in text


def test_only_load_flag():
    from bench.__main__ import parse_args

    assert parse_args(["--only", "load"]).only == "load" and parse_args([]).only is None
    assert json.loads(json.dumps(vars(parse_args([]))))["wrk_seconds"] == 5.0


@needs_wrk
def test_peer_warm_up_loads_until_the_handler_processes_stand(server):
    handler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert peer.warm_up(handler, f"{server}/hot", b"{}", 2) == 1  # one python3, the same two rounds running
        assert len(Recorder.seen) > 0
    finally:
        peer.stop(handler)


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (a killed child waits as one until init reaps it)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(name))
    return members


def test_peer_stop_ends_the_whole_process_group():
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    peer.stop(leader)
    deadline = time.monotonic() + 10  # a bound for a broken stop, not a threshold: the signals are sent
    while _live_members(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(leader.pid) == []
