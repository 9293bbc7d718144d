"""`make bench`: every figure of issue 5 beside a floor measured in the same run, on the same machine.

Figures (python3 no-op function unless said otherwise):

- warm invoke p50 over HTTP at concurrency 1 vs a bare ASGI JSON echo p50 + a bare framed socketpair
  round trip (``floors.socketpair_round_trip``);
- with wrk (``bench/wrk.py``, ``bench/load.py``; issue 24): p50 at 1 connection, req/s at 32 vs the
  echo's, p99 and p99.9 (and errors) of those calls; the same beside serverless-offline, the peer
  (``bench/peer.py``); 50 functions round-robin on nodes of 1 and 2 processes (req/s, p99, CPU,
  hot-hit rate). ``--only load`` runs just these and the c=1 p50;
- hot acquire from the pool, p50: the real ``Pool`` and bwrap driver, in process (``inprocess``);
- cold start (no blank machine fits) vs a bare ``bwrap --unshare-all … python3 -I -S -c pass``;
- cold start from a per-runtime template: ``driver.create`` of a forked machine, in process (ready for
  code: isolated, agent answering), vs the same floor; the HTTP cold start above uses templates too
  (the node's default), and is also measured on a node with ``NIMBUS_TEMPLATES=off``;
- an idle initialised python3 machine's PSS (every process of the machine, /proc/<pid>/smaps_rollup);
- N idle initialised machines on the node (``--machines``; the goal is 500): all still answering after
  a health round, and the node's warm p50 with them vs just before they were made;
- function templates (``bench/snapshots.py``, issue 20): a FastAPI + Mangum app's cold start booted +
  Init vs forked from its template, vs the bare bwrap floor; a per-call no-op function's p50 and c=8
  throughput beside a shared one's hot calls and a plain template cold start on the same node; PSS of
  the app's template and of its idle forks;
- for each compiled runtime (go, rust, wasm): first build, cached deploy and warm p50;
- the console's pages (``bench/console.py``, issue 22): server time with 1,000 functions and 100,000
  invocations in the store, on SQLite and PostgreSQL (``--only console``);
- custom runtimes (``bench/provided.py``, issue 23): a provided function's hot p50/p99 (a stdlib python3
  Runtime API client, and awslambdaric) beside the python3 runtime's, same handler: the Runtime API hop
  (``--only provided``);
- on a host that can run Firecracker microVMs: boot and snapshot restore to agent ready vs the VMM alone
  (``bench/firecracker.py``); elsewhere those rows say why they were not measured.

Writes bench/results.json and bench/latency.png (warm vs cold histogram). Flags: ``--help``.
Profile the warm path with ``python -m bench.profile`` (py-spy; see bench/profile.py).
"""

import argparse
import asyncio
import base64
import io
import json
import statistics
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import httpx

from bench import (
    cluster,
    compiled,
    console,
    firecracker,
    floors,
    inprocess,
    lambda_api,
    load,
    plot,
    provided,
    report,
    snapshots,
    urls,
)
from bench.common import (
    HERE,
    NOOP_CODE,
    children,
    cmdline,
    comm,
    free_port,
    ms,
    p50_ms,
    parent,
    process_tree,
    start_echo,
    start_node,
    stop,
    tree_memory_kib,
    wait_http,
)
from bench.loadgen import sequential

BODY = b'{"hello": "world"}'
CONCURRENCY = 32
HEALTH_INTERVAL_S = 10.0
LAYER_REQUIREMENTS = "six==1.16.0\n"
COLD_GAP_S = 0.05  # between creating a function and its first call: arrivals, not a burst  # the node's default; the N-machines figure waits for a round to pass


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--machines", type=int, default=500,
                    help="N idle warm machines on the node (the goal's 500; ~25 s and ~2.5 GiB of RAM here)")
    ap.add_argument("--requests", type=int, default=400, help="sequential calls per p50 figure")
    ap.add_argument("--wrk-seconds", type=float, default=5.0,
                    help="length of each measured wrk run (c=1, c=32, the peer, N processes), after a 1 s warm-up")
    ap.add_argument("--only", choices=["load", "cluster", "console", "provided"],
                    help="load: only the c=1 figures and the wrk rows (echo, Nimbus, the peer, N processes); "
                         "cluster: only the cluster rows (nodes on PostgreSQL behind HAProxy); console: only the "
                         "console pages' server times (1,000 functions, 100,000 invocations); provided: only the custom "
                         "runtime rows (the Runtime API hop); no files written")
    ap.add_argument("--cold", type=int, default=30, help="cold starts measured (and bare bwrap runs)")
    ap.add_argument("--acquires", type=int, default=20_000, help="acquire/release pairs in the pool microbenchmark")
    ap.add_argument("--microvms", type=int, default=10, help="firecracker boots and restores measured (KVM hosts)")
    ap.add_argument("--skip-compiled", action="store_true", help="leave out go/rust/wasm (their builds are slow)")
    ap.add_argument("--fill-concurrency", type=int, default=8, help="parallel first calls when making N machines")
    return ap.parse_args(argv)


def create(base: str, name: str, **fields) -> None:
    r = httpx.post(f"{base}/api/v1/functions", timeout=60,
                   json={"name": name, "runtime": "python3", "code": NOOP_CODE, **fields})
    if r.status_code != 201:
        raise SystemExit(f"creating {name}: {r.status_code} {r.text[:300]}")


def call_all(base: str, names: list[str], conc: int) -> list[dict]:
    """Invoke each function once, ``conc`` at a time; the replies (or errors) in order."""

    async def run():
        sem = asyncio.Semaphore(conc)
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(name):
                async with sem:
                    try:
                        r = await client.post(f"{base}/api/v1/functions/{name}/invoke", content=b"{}")
                        return r.json() if r.status_code == 200 else {"status": f"http {r.status_code}"}
                    except httpx.HTTPError as exc:
                        return {"status": f"error {exc!r}"}
            return await asyncio.gather(*(one(n) for n in names))

    return asyncio.run(run())


def node_machines_memory(node_pid: int) -> dict:
    """PSS of every machine the node runs, templates included (their share is the machines' too).

    A booted machine is a bwrap child of the node; so is a template, whose Python's children are the
    machines it forked (one process tree each).
    """
    trees = templates = total_kib = 0
    for pid in children(node_pid):
        if comm(pid) != "bwrap":
            continue
        tree = process_tree(pid)
        template = next((p for p in tree if comm(p) != "bwrap" and comm(parent(p)) == "bwrap"
                         and b"nimbus.agent.template" in cmdline(p)), None)
        templates += template is not None
        trees += len(children(template)) if template is not None else 1
        total_kib += tree_memory_kib(pid)["pss_kib"]
    total = total_kib / 1024
    return {"trees": trees, "templates": templates, "total_mib": total, "mean_mib": total / trees if trees else 0.0}


def idle_machines(base: str, node_pid: int, invoke_url: str, args) -> tuple[dict, dict]:
    """N idle initialised machines on one node: all healthy after a health round, and the node's p50."""
    n = args.machines
    without = sequential(invoke_url, BODY, args.requests)
    names = [f"idle-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for name in names:
        create(base, name, concurrency=1)
    first = call_all(base, names, args.fill_concurrency)
    fill_s = time.perf_counter() - t0
    bad = [r for r in first if r.get("status") != "succeeded"]
    if bad:
        print(f"warning: {len(bad)} of {n} first calls did not succeed, e.g. {bad[0]}")
    filled_at = time.monotonic()
    # At least one full health round (pings every idle machine) must pass before they count as healthy.
    time.sleep(max(0.0, HEALTH_INTERVAL_S * 1.2 - (time.monotonic() - filled_at)))
    with_them = sequential(invoke_url, BODY, args.requests)
    memory = node_machines_memory(node_pid)
    health = httpx.get(f"{base}/health").json()
    second = call_all(base, names, args.fill_concurrency)
    starts: dict[str, int] = {}
    for r in second:
        key = r.get("start") if r.get("status") == "succeeded" else r.get("status")
        starts[str(key)] = starts.get(str(key), 0) + 1
    healthy = sum(1 for r in second if r.get("status") == "succeeded" and r.get("start") == "hot")
    p_without, p_with = p50_ms(without), p50_ms(with_them)
    row_healthy = {"value": healthy, "healthy": healthy, "machines": n, "second_call_starts": starts,
                   "health_rounds_waited": 1, "node_machines": health.get("machines"), "pool": health.get("pool"),
                   "node_machine_trees": memory["trees"], "node_templates": memory["templates"], "node_pss_mib_total": memory["total_mib"],
                   "node_pss_mib_per_machine": memory["mean_mib"], "fill_s": fill_s}
    row_p50 = {"value": p_with, "floor": p_without, "ratio": p_with / p_without, "machines": n,
               "floor_is": "the same node's warm p50 just before the N machines were made"}
    return row_healthy, row_p50


def layered_package() -> str:
    """A python3 package whose requirements.txt makes a dependency layer, and whose handler imports from it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("main.py", "import six\n\ndef handler(event, context):\n    return six.PY3\n")
        archive.writestr("requirements.txt", LAYER_REQUIREMENTS)
    return base64.b64encode(buffer.getvalue()).decode()


def http_cold_starts(home: Path, n: int, templates: str, *, layered: bool = False,
                     deploys: list[float] | None = None) -> tuple[list[float], int]:
    """Cold starts over HTTP on a fresh node (NIMBUS_TEMPLATES=``templates``); (times, calls not cold).

    Each call is the first of a new function with memory_mb 256, a size no blank machine has, so a
    machine is made for it; a fresh node keeps the figure clear of the other runs' machines and load.
    ``layered``: each function is a package with the same requirements.txt, so its machine mounts the
    (cached) dependency layer; ``deploys`` collects how long each create took (the first resolves the layer).
    """
    port = free_port()
    # Room for every machine made here and the blank ones: a full node would evict before each start.
    node = start_node(port, home, runtimes="python3", templates=templates, max_machines=n + 32)
    base = f"http://127.0.0.1:{port}"
    times, not_cold = [], 0
    # One client, its connection open: httpx.post() would build a client (and an SSL context, ~30 ms)
    # inside the timed call.
    client = httpx.Client(timeout=30)
    try:
        wait_http(f"{base}/health")
        for i in range(n):
            fn = f"cold-{uuid.uuid4().hex[:6]}-{i}"
            began = time.perf_counter()
            if layered:
                create(base, fn, memory_mb=256, code=None, code_base64=layered_package())
            else:
                create(base, fn, memory_mb=256)
            if deploys is not None:
                deploys.append(time.perf_counter() - began)
            client.get(f"{base}/health")  # the connection is open before the timed call
            time.sleep(COLD_GAP_S)
            t = time.perf_counter()
            out = client.post(f"{base}/api/v1/functions/{fn}/invoke", json={}).json()
            if out.get("start") == "cold":
                times.append(time.perf_counter() - t)
            else:
                not_cold += 1
    finally:
        client.close()
        stop(node)
    return times, not_cold


LOAD_ROWS = ("wrk_p50_ms_c1", "warm_throughput_rps_c32", "warm_p99_ms_c32", "peer_throughput_rps_c32",
             "peer_p50_ms_c1", "processes_one_fn_rps_c32_n1", "processes_one_fn_rps_c32_n2",
             "processes_rps_c32_n1", "processes_rps_c32_n2")


def finish_load(results: dict[str, dict]) -> None:
    """``--only load``: the table and details of the rows measured, nothing written."""
    table = {k: results[k] for k in ("warm_p50_ms", "lambda_invoke_p50_ms", "url_invoke_p50_ms", *LOAD_ROWS)
             if k in results}
    report.annotate(table)
    print()
    print(report.render(table))
    print()
    print(report.details(table))


def only_cluster(args) -> None:
    """``--only cluster``: the cluster rows and their details, nothing written."""
    table = cluster.measure(BODY, args.wrk_seconds, args.requests)
    report.annotate(table)
    print()
    print(report.render(table))
    print()
    print("\n".join(cluster.details(table)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only == "cluster":
        return only_cluster(args)
    if args.only == "console":
        return console.main()
    if args.only == "provided":
        return provided.main()
    started = time.monotonic()
    results: dict[str, dict] = {}
    samples: dict[str, list[float]] = {}
    home = tempfile.mkdtemp(prefix="nimbus-bench-")
    echo_port, node_port = free_port(), free_port()
    max_machines = args.machines + 2 * CONCURRENCY + args.cold + 16
    echo = start_echo(echo_port)
    node = start_node(node_port, Path(home), min_warm=1, runtimes="python3", max_machines=max_machines,
                      health_interval_s=HEALTH_INTERVAL_S)
    try:
        echo_url = f"http://127.0.0.1:{echo_port}/"
        base = f"http://127.0.0.1:{node_port}"
        wait_http(echo_url)
        wait_http(f"{base}/health")
        name = f"bench-{uuid.uuid4().hex[:6]}"
        create(base, name, concurrency=CONCURRENCY)
        invoke_url = f"{base}/api/v1/functions/{name}/invoke"

        print("warm, concurrency 1 ...", flush=True)
        echo_seq = p50_ms(sequential(echo_url, BODY, args.requests * 5))  # cheap; noisy at ~0.1 ms
        pair = p50_ms(floors.socketpair_round_trip())
        samples["warm"] = sequential(invoke_url, BODY, args.requests)
        warm = p50_ms(samples["warm"])
        floor = echo_seq + pair
        results["warm_p50_ms"] = {"value": warm, "floor": floor, "ratio": warm / floor,
                                  "floor_parts": {"asgi_echo_p50_ms": echo_seq, "socketpair_rtt_p50_ms": pair}}

        if args.only is None:
            print("warm, Lambda API (/2015-03-31) beside /api/v1 ...", flush=True)
            results["lambda_invoke_p50_ms"] = lambda_api.measure(
                invoke_url, f"{base}/2015-03-31/functions/{name}/invocations", BODY, args.requests)

            print("warm, function URL (/fn/) beside /api/v1 ...", flush=True)
            results["url_invoke_p50_ms"] = urls.measure(base, name, invoke_url, BODY, args.requests)

        results.update(load.measure(echo_url, invoke_url, BODY, Path(home) / "load", args.wrk_seconds, node.pid))
        if args.only == "load":
            return finish_load(results)

        print(f"cold starts ({args.cold}, on fresh nodes with and without templates) ...", flush=True)
        colds, not_cold = http_cold_starts(Path(home) / "templates", args.cold, "auto")
        samples["cold"] = colds
        bare = floors.bare_bwrap_start(args.cold)
        cold = p50_ms(colds)
        booted, _ = http_cold_starts(Path(home) / "boot", args.cold, "off")
        results["cold_start_p50_ms"] = {"value": cold, "floor": p50_ms(bare), "ratio": cold / p50_ms(bare),
                                        "samples": len(colds), "not_cold": not_cold,
                                        "p90_ms": ms(statistics.quantiles(colds, n=10)[8]),
                                        "floor_samples": len(bare), "templates": "auto (the default)",
                                        "booted_p50_ms": p50_ms(booted) if booted else None,
                                        "booted_samples": len(booted)}
        floor_ms = p50_ms(bare)

        print(f"cold starts of functions with a dependency layer ({args.cold}) ...", flush=True)
        deploys: list[float] = []
        layered, _ = http_cold_starts(Path(home) / "layered", args.cold, "auto", layered=True, deploys=deploys)
        results["layered_cold_start_p50_ms"] = {
            "value": p50_ms(layered), "floor": cold, "ratio": p50_ms(layered) / cold, "samples": len(layered),
            "requirements": LAYER_REQUIREMENTS.strip(), "first_deploy_ms": ms(deploys[0]),
            "cached_deploy_p50_ms": p50_ms(deploys[1:]) if len(deploys) > 1 else None}

        snapshot_rows, samples["per_call"] = snapshots.measure(Path(home) / "snapshots", floor_ms,
                                                               requests=args.requests, cold=args.cold)

        print(f"{args.machines} idle machines ...", flush=True)
        healthy_row, p50_row = idle_machines(base, node.pid, invoke_url, args)

        if not args.skip_compiled:
            print("compiled runtimes ...", flush=True)
            extra = compiled.measure(base, BODY, floor, args.requests // 2)
        else:
            extra = {}
    finally:
        stop(node, echo)

    print("in-process pool microbenchmark and PSS ...", flush=True)
    pool_rows = inprocess.measure(args.acquires)
    results["hot_acquire_p50_us"] = pool_rows["hot_acquire_p50_us"]
    # Order the table as the issue does.
    ordered = {k: results[k] for k in ("warm_p50_ms", "lambda_invoke_p50_ms", "url_invoke_p50_ms", *LOAD_ROWS)
               if k in results}
    ordered["hot_acquire_p50_us"] = pool_rows["hot_acquire_p50_us"]
    ordered["cold_start_p50_ms"] = results["cold_start_p50_ms"]
    ordered["cold_start_p50_ms"]["in_process"] = pool_rows["cold_parts"]
    forked = pool_rows["cold_parts"]["template"]
    if forked is None:
        ordered["template_cold_start_p50_ms"] = {"value": None, "note": pool_rows["cold_parts"]["templates"],
                                                 "floor": floor_ms, "ratio": None}
    else:  # a machine ready for code: forked, isolated, its agent answering (what the bare floor starts)
        value = forked["create_p50_ms"]
        ordered["template_cold_start_p50_ms"] = {"value": value, "floor": floor_ms, "ratio": value / floor_ms,
                                                 "init_p50_ms": forked["init_p50_ms"], "samples": forked["samples"]}
    ordered["layered_cold_start_p50_ms"] = results["layered_cold_start_p50_ms"]
    ordered.update(snapshot_rows)
    ordered["idle_machine_pss_mib"] = pool_rows["idle_machine_pss_mib"]
    ordered["idle_machines_healthy"] = healthy_row
    ordered["node_p50_with_idle_machines_ms"] = p50_row
    ordered.update(extra)
    print("firecracker microVMs (where this host can run them) ...", flush=True)
    ordered.update(firecracker.measure(args.microvms))
    ordered.update(cluster.measure(BODY, args.wrk_seconds, args.requests, Path(home) / "cluster"))
    ordered.update(console.measure(Path(home) / "console"))
    print("custom runtimes (provided) ...", flush=True)
    ordered.update(provided.measure(Path(home) / "provided", args.requests))
    report.annotate(ordered)
    ordered["_run"] = {"seconds": time.monotonic() - started, "args": vars(args),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    plot.latency_histogram(HERE / "latency.png", {
        "warm (hot), c=1": [ms(s) for s in samples["warm"]],
        "cold start": [ms(s) for s in samples["cold"]],
        "per-call (a fork each), c=1": [ms(s) for s in samples["per_call"]],
    }, "Nimbus python3 no-op invoke latency: warm vs cold vs per-call")
    (HERE / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")

    table = {k: v for k, v in ordered.items() if not k.startswith("_")}
    print()
    print(report.render(table))
    print()
    print(report.details(table))
    print("\n".join(cluster.details(table)))
    print("\n".join(console.details({k: v for k, v in table.items() if k.startswith("console_")})))
    print("\n".join(provided.details(table)))
    print(f"\nN = {args.machines} idle machines (goal: 500; --machines N). Took {ordered['_run']['seconds']:.0f} s. "
          f"Wrote {HERE / 'results.json'} and {HERE / 'latency.png'}.")


if __name__ == "__main__":
    main()
