"""The fuzz layer: one real node for the module, and a tally of every request the fuzzer sent.

The figure (``fuzz: N examples run, M 5xx``) goes into pytest's terminal summary so a CI log carries it.
"""

import collections
from pathlib import Path

import pytest

TALLY_KEY = pytest.StashKey[collections.Counter]()
ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _tally(config) -> collections.Counter:
    return config.stash.setdefault(TALLY_KEY, collections.Counter())


@pytest.fixture(scope="session")
def fuzz_tally(pytestconfig) -> collections.Counter:
    return _tally(pytestconfig)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fuzz_node(request, tmp_path_factory):
    """A whole node (uvicorn, bwrap machines, SQLite in a scratch home or the run's PostgreSQL database) on a
    free port, for the module.

    Builds are capped at a few seconds: the fuzzer may ask for go, rust or wasm code, and a garbage
    source must cost a short failed build, not minutes.
    """
    # The root conftest's RunningNode and node_settings: every conftest here is a module named
    # "conftest", so it is fetched from pytest's registry by path rather than imported by name.
    root = request.config.pluginmanager.get_plugin(str(ROOT_CONFTEST))
    home = tmp_path_factory.mktemp("fuzz-home")
    url = f"sqlite:///{home / 'nimbus.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    settings = root.node_settings(home, url, runtimes=["python3"], build_timeout_s=15.0, queue_size=64)
    with root.RunningNode(settings) as running:
        yield running


def pytest_terminal_summary(terminalreporter):
    tally = terminalreporter.config.stash.get(TALLY_KEY, None)
    if tally and tally["examples"]:
        terminalreporter.write_line(
            f"fuzz: {tally['examples']} examples run, {tally['5xx']} 5xx "
            f"({tally['2xx']} 2xx, {tally['4xx']} 4xx; {tally['failures']} check failures)")
        if terminalreporter.verbosity > 0:  # -v: which operation answered what, how often
            for key in sorted(key for key in tally if " -> " in key):
                terminalreporter.write_line(f"  {key}: {tally[key]}")
