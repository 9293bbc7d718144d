"""Fixtures shared by every test layer: real databases (SQLite and PostgreSQL), a scratch NIMBUS_HOME."""

import asyncio
import os
import uuid

import pytest

PG_ADMIN_DSN = os.environ.get("NIMBUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(sql: str) -> None:
    await _pg_admin_at(PG_ADMIN_DSN, sql)


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this pytest run, dropped at the end."""
    name = f"nimbus_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """Each test that takes this runs once on SQLite (a new file) and once on PostgreSQL.

    Tests on PostgreSQL share the run's database, so they must not assume an empty one: use unique names.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nimbus.db'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture
async def empty_database_url(database_url):
    """A database of the test's own, with nothing in it: its SQLite file, or a new PostgreSQL database (for
    tests that migrate from scratch, rename or lock tables, or sweep across every function)."""
    if database_url.startswith("sqlite"):
        yield database_url
        return
    name = f"nimbus_own_{uuid.uuid4().hex[:12]}"
    base = database_url.rsplit("/", 1)[0]
    await _pg_admin_at(database_url, f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        await _pg_admin_at(database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _pg_admin_at(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# ---------------------------------------------------------------- a real node


class RunningNode:
    """A whole node (uvicorn + store + pool + bwrap machines) served on a free port in a thread of its own."""

    def __init__(self, settings) -> None:
        import threading

        import uvicorn

        from nimbus.app import create_app, server_config

        self.settings = settings
        self.app = create_app(settings)
        # The node's own server configuration (its client deadlines included), on a free loopback port.
        config = server_config(self.app, settings, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="nimbus-node", daemon=True)

    def __enter__(self) -> "RunningNode":
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the node did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def node(self):
        return self.app.state.node

    def client(self, **kwargs):
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def node_settings(home, database_url: str, **overrides):
    from nimbus.config import Settings

    # Function templates off unless a test asks: many tests tell a new machine from a reused one by a value
    # its module draws at import, which every fork of a template shares (tests/integration/test_snapshots.py).
    values = dict(home=home, database_url=database_url, port=0, min_warm=1, health_interval_s=5.0,
                  function_templates="off")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_node():
    """Start a node of one's own: ``with make_node(home, database_url, **settings) as running: ...``."""
    return lambda home, database_url, **overrides: RunningNode(node_settings(home, database_url, **overrides))


@pytest.fixture(scope="module")
def make_module_node():
    """``make_node`` for module-scoped fixtures (a node shared by a module's tests, with settings of its own)."""
    return lambda home, database_url, **overrides: RunningNode(node_settings(home, database_url, **overrides))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def node(request, tmp_path_factory):
    """One node per test module and database kind; tests use unique function names."""
    home = tmp_path_factory.mktemp("home")
    url = f"sqlite:///{home / 'nimbus.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    with RunningNode(node_settings(home, url)) as running:
        yield running


@pytest.fixture
def api(node):
    with node.client() as client:
        yield client
