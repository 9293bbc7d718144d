"""The issue's goals, and the table `make bench` prints: figure, value, floor, ratio, goal, met."""

# key -> (goal as the issue states it, test on the row). A row whose value is None is "n/a".
GOALS = {
    "warm_p50_ms": ("<= 2.5x floor", lambda r: r["ratio"] <= 2.5),
    "lambda_invoke_p50_ms": ("<= 1.10x /api/v1", lambda r: r["ratio"] <= 1.10),
    "url_invoke_p50_ms": ("<= 1.15x /api/v1", lambda r: r["ratio"] <= 1.15),
    "warm_throughput_rps_c32": (">= 0.40x floor", lambda r: r["ratio"] >= 0.40),
    "warm_p99_ms_c32": ("<= 25 ms, 0 errors", lambda r: r["value"] <= 25 and r["errors"] == 0),
    "peer_throughput_rps_c32": (">= 2x peer", lambda r: r["ratio"] >= 2),
    "peer_p50_ms_c1": ("<= 1.0x peer", lambda r: r["ratio"] <= 1.0),
    "hot_acquire_p50_us": ("<= 50 us", lambda r: r["value"] <= 50),
    "cold_start_p50_ms": ("<= 1.5x floor", lambda r: r["ratio"] <= 1.5),
    "template_cold_start_p50_ms": ("<= 0.3x floor", lambda r: r["ratio"] <= 0.3),
    "fastapi_forked_start_p50_ms": ("<= 10 ms, >= 10x booted", lambda r: r["value"] <= 10 and (r["speedup"] or 0) >= 10),
    "fastapi_forked_primed_start_p50_ms": ("<= 10 ms, >= 10x booted",
                                           lambda r: r["value"] <= 10 and (r["speedup"] or 0) >= 10),
    "per_call_p50_ms": ("<= 5 ms", lambda r: r["value"] <= 5),
    "idle_machine_pss_mib": ("<= 12 MiB", lambda r: r["value"] <= 12),
    "idle_machines_healthy": ("500 all healthy", lambda r: r["healthy"] == r["machines"] >= 500),
    "node_p50_with_idle_machines_ms": ("<= 1.2x floor", lambda r: r["ratio"] <= 1.2),
    "provided_warm_p50_ms": ("hop <= 0.3 ms", lambda r: r["hop_ms"] <= 0.3),
}

LABELS = {
    "warm_p50_ms": "warm invoke p50, HTTP, c=1 (ms)",
    "lambda_invoke_p50_ms": "warm Lambda API Invoke p50, c=1 (ms)",
    "url_invoke_p50_ms": "hot function URL p50, c=1 (ms)",
    "wrk_p50_ms_c1": "wrk p50, c=1 (ms)",
    "warm_throughput_rps_c32": "wrk warm throughput, c=32 (req/s)",
    "warm_p99_ms_c32": "wrk warm p99, c=32 (ms)",
    "peer_throughput_rps_c32": "req/s c=32 vs serverless-offline",
    "peer_p50_ms_c1": "p50 c=1 vs serverless-offline (ms)",
    "processes_one_fn_rps_c32_n1": "1 fn, c=32, 1 proc, fresh node (req/s)",
    "processes_one_fn_rps_c32_n2": "1 fn, c=32, 2 procs, fresh node (req/s)",
    "processes_rps_c32_n1": "50 fns round-robin, 1 proc (req/s)",
    "processes_rps_c32_n2": "50 fns round-robin, 2 procs (req/s)",
    "hot_acquire_p50_us": "hot acquire from pool p50 (us)",
    "cold_start_p50_ms": "cold start, no blank machine (ms)",
    "template_cold_start_p50_ms": "cold start from template (ms)",
    "layered_cold_start_p50_ms": "cold start with a dependency layer (ms)",
    "fastapi_booted_cold_start_p50_ms": "FastAPI cold start, booted + Init (ms)",
    "fastapi_forked_start_p50_ms": "FastAPI forked from its template (ms)",
    "fastapi_forked_primed_start_p50_ms": "the same, primed before the snapshot (ms)",
    "fastapi_per_call_spare_p50_ms": "primed, per-call on a fork made ahead (ms)",
    "per_call_p50_ms": "per-call no-op p50, HTTP, c=1 (ms)",
    "per_call_template_cold_start_p50_ms": "same node, runtime-template cold (ms)",
    "per_call_throughput_rps_c8": "per-call throughput, c=8 (req/s)",
    "function_template_pss_mib": "FastAPI function template PSS (MiB)",
    "function_template_fork_pss_mib": "idle fork of it, PSS (MiB)",
    "idle_machine_pss_mib": "idle warm python3 machine PSS (MiB)",
    "idle_machines_healthy": "N idle warm machines healthy",
    "node_p50_with_idle_machines_ms": "node p50 with N idle (ms)",
    "firecracker_boot_p50_ms": "firecracker boot to agent ready (ms)",
    "firecracker_restore_p50_ms": "firecracker restore to agent ready (ms)",
    "cluster_hop_p50_ms_c1": "warm p50 c=1, HAProxy vs direct (ms)",
    "cluster_rps_c32": "2 nodes via HAProxy vs 1, c=32 (req/s)",
    "cluster_hot_share": "hot-hit share, hash vs roundrobin",
    "cluster_async_pickup_p50_ms": "async pick-up p50, NOTIFY vs poll (ms)",
    "cluster_async_pickup_p90_ms": "async pick-up p90, NOTIFY vs poll (ms)",
    "provided_warm_p50_ms": "provided hot p50 vs python3 (ms)",
    "provided_minimal_warm_p50_ms": "provided, minimal client, hot p50 vs python3 (ms)",
    "awslambdaric_warm_p50_ms": "awslambdaric hot p50 vs python3 (ms)",
    "provided_cold_start_p50_ms": "provided cold start vs python3 (ms)",
}


def annotate(results: dict[str, dict]) -> None:
    """Add ``goal`` and ``met`` to every row the issue sets a goal for."""
    for key, row in results.items():
        if key in GOALS:
            text, test = GOALS[key]
            row["goal"] = text
            row["met"] = None if row.get("value") is None else bool(test(row))


def _num(value, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, str):
        return f"{value:>{width}}"
    return f"{value:{width}.3f}" if abs(value) < 1000 else f"{value:{width}.1f}"


def render(results: dict[str, dict]) -> str:
    lines = [f"{'figure':38} {'value':>12} {'floor':>10} {'ratio':>7}  {'goal':20} met"]
    for key, row in results.items():
        label = LABELS.get(key, key)
        if row.get("value") is None:
            value = row.get("note", "n/a")
        elif key == "idle_machines_healthy":
            value = f"{row['healthy']}/{row['machines']}"
        else:
            value = row["value"]
        met = {True: "yes", False: "NO", None: "-"}[row.get("met")] if "goal" in row else ""
        floor = row.get("floor")
        ratio = f"{row['ratio']:6.2f}x" if row.get("ratio") is not None else f"{'-':>7}"
        if isinstance(value, str) and len(value) > 12:
            lines.append(f"{label:38} {value}")
            lines[-1] += f"  {'':>7}  {row.get('goal', ''):20} {met}"
            continue
        lines.append(f"{label:38} {_num(value, 12)} {_num(floor, 10)} {ratio}  {row.get('goal', ''):20} {met}")
    return "\n".join(lines)


def details(results: dict[str, dict]) -> str:
    """The second part of the report: what each floor is made of and the context of each figure."""
    out = []
    w = results.get("warm_p50_ms")
    if w:
        parts = w["floor_parts"]
        out.append(f"warm p50 floor = ASGI echo p50 {parts['asgi_echo_p50_ms']:.3f} ms + framed socketpair round trip "
                   f"{parts['socketpair_rtt_p50_ms']:.3f} ms")
    out += _load_details(results)
    h = results.get("hot_acquire_p50_us")
    if h:
        out.append(f"hot acquire: p50 {h['value']:.2f} us, p99 {h['p99_us']:.2f} us, release p50 "
                   f"{h['release_p50_us']:.2f} us ({h['samples']} acquire/release pairs, real Pool + bwrap machine)")
    c = results.get("cold_start_p50_ms")
    if c:
        out.append(f"cold start: {c['samples']} calls of fresh functions (memory_mb 256, so no blank machine fits), "
                   f"p90 {c['p90_ms']:.1f} ms; floor = bare bwrap p50 over {c['floor_samples']} runs")
        if c.get("booted_p50_ms") is not None:
            out.append(f"cold start over HTTP on a node with NIMBUS_TEMPLATES=off (every machine boots): p50 "
                       f"{c['booted_p50_ms']:.1f} ms over {c['booted_samples']} calls")
        parts = c.get("in_process")
        for kind in ("boot", "template"):
            part = (parts or {}).get(kind)
            if part:
                out.append(f"cold start in process, {kind} (no HTTP, no store): driver.create p50 "
                           f"{part['create_p50_ms']:.1f} ms + Init p50 {part['init_p50_ms']:.1f} ms "
                           f"(cgroups: {part['cgroups']}; seccomp: {part['seccomp']})")
        if parts:
            out.append(f"templates: {parts['templates']}")
    lay = results.get("layered_cold_start_p50_ms")
    if lay:
        out.append(f"cold start with a dependency layer ({lay['requirements']}, mounted read-only at /opt/layer): "
                   f"{lay['samples']} first calls; floor = the plain cold start above; deploy resolving the layer "
                   f"{lay['first_deploy_ms']:.0f} ms, deploys with the cached layer p50 "
                   f"{lay['cached_deploy_p50_ms']:.1f} ms")
    out += _snapshot_details(results)
    m = results.get("idle_machine_pss_mib")
    if m:
        out.append(f"PSS: {m['machines_side_by_side']} initialised idle machines side by side, "
                   f"{m['processes_per_machine']} processes each, PSS {m['pss_mib_each']} MiB, RSS p50 "
                   f"{m['rss_mib_median']:.1f} MiB")
    n = results.get("idle_machines_healthy")
    if n:
        out.append(f"N={n['machines']} idle initialised machines (one per function) beside the node's others "
                   f"({n['node_machines']} in all): {n['healthy']} answered hot after {n['health_rounds_waited']} "
                   f"health round(s); starts on the second call {n['second_call_starts']}; "
                   f"mean PSS per machine on the node {n['node_pss_mib_per_machine']:.2f} MiB "
                   f"({n['node_machine_trees']} machines, {n.get('node_templates', 0)} template(s) counted in, "
                   f"{n['node_pss_mib_total']:.0f} MiB in all); "
                   f"filling took {n['fill_s']:.1f} s")
    for key in ("firecracker_boot_p50_ms", "firecracker_restore_p50_ms"):
        f = results.get(key)
        if f and f.get("value") is not None:
            steps = ", ".join(f"{name} {ms:.1f}" for name, ms in f["steps_p50_ms"].items())
            out.append(f"{LABELS[key]}: {f['samples']} machines; floor = the VMM alone (vmm.start + api.ready); "
                       f"steps p50 (ms): {steps}")
    return "\n".join(out)


def _snapshot_details(results: dict[str, dict]) -> list[str]:
    """The function-template rows' context (bench/snapshots.py)."""
    out = []
    b, f = results.get("fastapi_booted_cold_start_p50_ms"), results.get("fastapi_forked_start_p50_ms")
    if b:
        out.append(f"FastAPI + Mangum (requirements {' '.join(b['requirements'])}), API Gateway REST event, 200 checked: "
                   f"booted + Init on a node with {b['node']}, {b['samples']} first calls of fresh copies "
                   f"(memory_mb 256), not counted {b['not_counted']}; deploy resolving the layer "
                   f"{b['first_deploy_ms']:.0f} ms, cached {b['cached_deploy_p50_ms']:.1f} ms")
    for row in (f, results.get("fastapi_forked_primed_start_p50_ms")):
        if row and row.get("value") is not None:
            speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
            out.append(f"FastAPI forked, {row['app']} ({row['node']}): {row['samples']} calls, p90 {row['p90_ms']:.1f} ms, "
                       f"{speedup} faster than booted + Init, first call (boot + Init) {row['first_call_ms']:.0f} ms, "
                       f"not counted {row['not_counted']}; floor = bare bwrap")
    sp = results.get("fastapi_per_call_spare_p50_ms")
    if sp:
        out.append(f"FastAPI per-call: {sp['what']}: {sp['samples']} calls, p90 {sp['p90_ms']:.1f} ms, "
                   f"not counted {sp['not_counted']}; floor = bare bwrap")
    p = results.get("per_call_p50_ms")
    if p:
        out.append(f"per-call no-op: {p['samples']} calls (all forked; {p['spares']} spares kept), p90 "
                   f"{p['p90_ms']:.1f} ms, not counted {p['not_counted']}; floor = hot p50 of a shared no-op on the same "
                   f"node over {p['hot_samples']} calls; cold start from the runtime template there "
                   f"{p['template_cold_p50_ms']:.1f} ms over {p['template_cold_samples']} (alternating rounds)")
    t = results.get("per_call_throughput_rps_c8")
    if t:
        out.append(f"per-call c={t['concurrency']}: {t['requests']} calls, p50 {t['p50_ms']:.1f} ms, p99 "
                   f"{t['p99_ms']:.1f} ms, {t['errors']} errors, starts {t['starts']}; shared no-op at c={t['concurrency']}: "
                   f"p50 {t['hot_p50_ms']:.2f} ms, p99 {t['hot_p99_ms']:.2f} ms, starts {t['hot_starts']}")
    m, k = results.get("function_template_pss_mib"), results.get("function_template_fork_pss_mib")
    if m and k:
        out.append(f"FastAPI template: PSS {m['value']:.1f} MiB, RSS {m['rss_mib']:.1f} MiB, private "
                   f"{m['private_mib']:.1f} MiB ({m['processes']} processes); {k['forks']} idle forks ({k['forks_are']}), "
                   f"{k['processes_per_fork']} processes each: PSS {k['pss_mib_each']} MiB, RSS {k['rss_mib_each']} MiB, "
                   f"private {k['private_mib_each']} MiB")
    return out


def _load_details(results: dict[str, dict]) -> list[str]:
    """The wrk rows' context (bench/load.py): tails, errors, start kinds, the peer, processes."""
    out = []
    one = results.get("wrk_p50_ms_c1")
    if one and one.get("value") is not None:
        out.append(f"wrk c=1 ({one['tool']}): p50 {one['value']:.3f} ms, p99 {one['p99_ms']:.2f} ms, {one['requests']} "
                   f"calls, {one['errors']} errors; floor = the ASGI echo's wrk p50")
    p = results.get("warm_p99_ms_c32")
    if p and p.get("value") is not None:
        cpu = p.get("node_cpu_ms_per_call")
        out.append(f"wrk warm c=32 ({p['tool']}): p50 {p['p50_ms']:.2f} ms, p99 {p['value']:.2f} ms, p99.9 "
                   f"{p['p999_ms']:.2f} ms, max {p['max_ms']:.1f} ms; {p['errors']} errors {p['error_kinds']} "
                   f"(status = replies >= 400) of {p['requests']} calls"
                   + (f"; node CPU {cpu:.2f} ms per call (process tree, machines included)" if cpu is not None else "")
                   + f"; starts in a separate counting run {p['starts']}; ASGI echo at c=32: p50 "
                   f"{p['echo_p50_ms']:.2f} ms, p99 {p['echo_p99_ms']:.2f} ms, p99.9 {p['echo_p999_ms']:.2f} ms, "
                   f"{p['echo_errors']} errors")
    peer = results.get("peer_throughput_rps_c32")
    if peer and peer.get("value") is not None:
        f = peer["peer"]
        versions = ", ".join(f"{k} {v}" for k, v in f["packages"].items())
        out.append(f"peer: serverless-offline ({versions}; python handler, serverless offline, same wrk): "
                   f"c=1 p50 {f['p50_ms_c1']:.3f} ms; c=32 (after warming until {f.get('handler_processes', '?')} handler "
                   f"processes stood) {f['rps']:.0f} req/s, p50 {f['p50_ms']:.2f} ms, p99 "
                   f"{f['p99_ms']:.1f} ms, p99.9 {f['p999_ms']:.1f} ms, {f['errors']} errors; Nimbus c=32 p99 "
                   f"{peer['nimbus_p99_ms_c32']:.2f} ms")
    elif peer:
        out.append(f"peer: {peer.get('note')}")
    for key in ("processes_one_fn_rps_c32_n1", "processes_one_fn_rps_c32_n2", "processes_rps_c32_n1",
                "processes_rps_c32_n2"):
        r = results.get(key)
        if not r or r.get("value") is None:
            continue
        hot = "-" if r["hot_share"] is None else f"{r['hot_share'] * 100:.1f}%"
        scaling = f"; {r['ratio']:.2f}x the 1-process node" if r.get("ratio") is not None else ""
        what = "1 function (concurrency 32)" if r["functions"] == 1 else f"{r['functions']} functions round-robin"
        out.append(f"{what}, c=32, NIMBUS_PROCESSES={r['processes']}: "
                   f"{r['rps']:.0f} req/s{scaling}, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.1f} ms, p99.9 "
                   f"{r['p999_ms']:.1f} ms, {r['errors']} errors; node CPU {r['node_cpu_cores']:.2f} cores, "
                   f"{r['node_cpu_ms_per_call']:.2f} ms per call; hot-hit rate {hot} (starts {r['starts']})")
    return out
