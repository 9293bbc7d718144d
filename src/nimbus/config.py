"""One Settings object: every field is ``NIMBUS_<FIELD>`` in the environment and a key in nimbus.toml.

Precedence, highest first: constructor arguments, environment, ``nimbus.toml`` (``$NIMBUS_HOME/nimbus.toml``
or the path in ``NIMBUS_CONFIG``), defaults.
"""

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from nimbus import runtimes
from nimbus.errors import InvalidRequest

DEFAULT_HOME = Path(".nimbus")
DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 1024
DEFAULT_WORKERS = 64


def _toml_path() -> Path:
    explicit = os.environ.get("NIMBUS_CONFIG")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("NIMBUS_HOME", DEFAULT_HOME)) / "nimbus.toml"


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"


class Settings(BaseSettings):
    """The node's configuration; see the README's Configuration table."""

    model_config = SettingsConfigDict(env_prefix="NIMBUS_", extra="ignore", validate_default=True)
    _process_index: int = PrivateAttr(0)  # set by nimbus.processes.worker_settings, never by the environment

    home: Path = Field(DEFAULT_HOME, description="database, artifacts, images, sockets")
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    database_url: str = Field("", description="default: SQLite at $NIMBUS_HOME/nimbus.db")
    driver: Literal["bwrap", "firecracker"] = "bwrap"
    min_warm: int = Field(1, ge=0, le=64, description="blank machines kept booted per runtime, at least")
    max_warm: int = Field(8, ge=0, le=1024, description="blank machines kept booted per runtime, at most: "
                          "the pool sizes itself in [min_warm, max_warm] from the recent warm and cold start rate")
    autoscale_window_s: float = Field(30.0, gt=0, le=3600, description="time constant of the decayed start rate "
                                      "the blank-machine target follows")
    templates: Literal["auto", "on", "off"] = Field("auto", description="fork machines from a per-runtime template "
                                                   "sandbox (bwrap on a root node with cgroups; auto: when possible)")
    function_templates: Literal["auto", "eager", "off"] = Field(
        "auto", description="a python3 version whose Init took function_template_min_init_ms or more, and every "
        "per-call function, forks new machines from a template that ran its Init, made after its first start "
        "(auto: where the driver can; bwrap needs runtime templates and user namespaces); eager: every python3 "
        "version gets one when deployed")
    function_template_min_init_ms: float = Field(
        20.0, ge=0, le=600_000, description="how long a version's Init must take before it gets a function template "
        "(a fork costs ~7 ms)")
    max_function_templates: int = Field(
        16, ge=0, le=4096, description="function templates on this node at most (the least recently used goes "
        "first); each also counts against max_machines")
    per_call_spares: int = Field(
        2, ge=0, le=64, description="machines forked ahead per per-call function, so a call does not wait for its fork")
    max_machines: int = Field(64, ge=1, description="all machines on this node")
    reply_buffer_mb: int = Field(256, ge=1, description="MiB of machine replies the node reads at once; a reply "
                                 "that does not fit waits for others (at least one largest reply always fits)")
    machine_uid_base: int = Field(0x70000000, ge=1, le=(1 << 31) - 1, description="first host uid (and gid) given "
                                  "to machines on a root node, one per machine; outside /etc/subuid ranges and users")
    machine_uid_count: int = Field(65536, ge=1, le=1 << 24, description="how many uids from machine_uid_base machines "
                                   "may use: at most this many machines at once")
    keepalive_s: float = Field(30.0, gt=0, le=3600, description="how long an idle kept-alive client connection is "
                               "kept open; above a load balancer's own idle time, so the node never closes a "
                               "connection the balancer is about to reuse")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="how long a client may take to send a "
                                    "request's headers (and to start the next one on a kept-alive connection)")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="how long a client may take to send a "
                                  "request's body once its headers are in (408 after that)")
    max_age_s: float = Field(3600.0, gt=0, description="a machine older than this is recycled")
    max_uses: int = Field(10_000, ge=1, description="a machine that served this many calls is recycled")
    idle_ttl_s: float = Field(300.0, gt=0, description="how long an idle initialised machine is kept")
    health_interval_s: float = Field(10.0, gt=0, description="how often idle machines are pinged")
    queue_size: int = Field(DEFAULT_QUEUE_SIZE, ge=1, description="invocations waiting for a worker")
    workers: int = Field(DEFAULT_WORKERS, ge=1, description="invocations run at once on this node")
    processes: int = Field(1, ge=1, le=256, description="worker processes of this node, each a whole node (own "
                           "pool, machines, scheduler) on the same port and store; the node-wide budgets "
                           "(max_machines, workers, machine uids…) are split between them (nimbus.processes)")
    tenant_queue_share: float = Field(0.5, gt=0, le=1, description="the part of this node's sync calls (waiting "
                                      "and running) one tenant may hold; past it that tenant gets 429")
    write_behind_ms: float = Field(5.0, ge=0, le=60_000, description="how long a finished sync invocation may wait "
                                   "in memory to be written with others in one INSERT; 0: written before the reply")
    function_cache_s: float = Field(1.0, ge=0, le=60, description="how long a sync invoke's function look-up is cached")
    code_cache_mb: int = Field(256, ge=0, le=1 << 20, description="memory for the code machines load, kept between "
                               "starts (least recently used goes first; code bigger than this is never kept)")
    async_poll_s: float = Field(1.0, gt=0, description="how often the store is polled for async work")
    schedules: Literal["on", "off"] = Field("on", description="fire schedules' ticks from this node (every "
                                            "node may: each tick fires once across the cluster)")
    schedule_poll_s: float = Field(1.0, gt=0, le=60, description="how often the store is polled for due "
                                   "schedule ticks")
    async_lease_s: float = Field(60.0, gt=0, description="lease on a claimed async invocation, renewed while it runs")
    async_retry_base_s: float = Field(1.0, gt=0, le=3600, description="backoff before the first retry of a failed "
                                      "async invocation; doubles")
    retention_max_age_s: float = Field(7 * 86400.0, ge=0, description="finished invocations older than this are "
                                       "deleted; 0: kept whatever their age")
    retention_max_count: int = Field(1000, ge=0, description="finished invocations kept per function, the newest; "
                                     "older ones are deleted; 0: no limit")
    retention_interval_s: float = Field(60.0, gt=0, le=86400, description="how often the node deletes what "
                                        "retention allows and measures each tenant's stored bytes")
    tenant_store_mb: float = Field(1024.0, gt=0, description="MiB of events, results and logs a tenant's stored "
                                   "invocations may hold: beyond it async calls get 429, sync results are not kept")
    callback_allow: str = Field("", description="hosts, IPs and CIDRs callback_url may name (comma-separated); "
                                "empty refuses callbacks")
    runtimes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["python3", "nodejs"],
                                                     description="runtimes pre-warmed")
    sdk_layer: bool = Field(True, description="every python3 and nodejs machine gets the AWS SDK Lambda bundles "
                            "(boto3; the @aws-sdk v3 clients) read-only, built once per host before machines boot; "
                            "a function's own pinned copy wins")
    sdk_cache: Path = Field(default_factory=lambda: _user_cache() / "nimbus" / "sdk", description="where the "
                            "bundled SDK is built, shared by every node on the host (default: "
                            "$XDG_CACHE_HOME/nimbus/sdk or ~/.cache/nimbus/sdk)")
    build_sdists: bool = Field(True, description="a requirements.txt package with no wheel is built from its "
                               "source distribution in the builder sandbox, whose only network is the package "
                               "index; off: wheels only")
    builder: Literal["sandbox", "docker"] = Field("sandbox", description="where Go/Rust/WASM builds run")
    build_timeout_s: float = Field(300.0, gt=0, le=3600, description="wall-clock limit of one build")
    build_memory_mb: int = Field(2048, ge=256, description="memory limit of one build")
    build_concurrency: int = Field(1, ge=1, le=64, description="builds run at once on this node")
    builder_go_image: str = Field("golang:1.19", description="image of the docker builder for go")
    builder_rust_image: str = Field("rust:1.95", description="image of the docker builder for rust")
    auth: Literal["off", "on"] = Field("off", description="on: every API call needs an API key (Bearer); "
                                       "off: one tenant, loopback addresses only")
    auth_cache_s: float = Field(10.0, ge=0, le=3600, description="how long a key look-up is cached: a key revoked "
                                "on another node stops working within this time (0: ask the store every call)")
    rate_limit: float = Field(0.0, ge=0, description="requests/s per API key (per client address with auth off); "
                              "0: no limit")
    rate_burst: int = Field(0, ge=0, description="requests a caller may send at once above the rate; "
                            "0: one second's worth")
    console: Literal["on", "off"] = Field("on", description="the web console at /console (with auth on, its "
                                          "login takes an API key)")
    console_session_s: float = Field(43200.0, ge=60, le=30 * 86400, description="how long a console login lasts "
                                     "(its cookie's Max-Age); revoking its key ends it at once")
    firecracker_bin: Path = Field(Path("/usr/local/bin/firecracker"), description="the firecracker binary "
                                  "(driver firecracker)")
    jailer_bin: Path = Field(Path("/usr/local/bin/jailer"), description="the jailer binary (driver firecracker)")
    jailer: Literal["on", "off"] = Field("on", description="off: run firecracker without the jailer (unconfined; "
                                         "a warning is logged)")
    chroot_base: Path = Field(Path("/srv/jailer"), description="where the jailer makes each microVM's jail")
    jail_uid: int = Field(65534, ge=0, description="uid the jailed firecracker runs as")
    jail_gid: int = Field(65534, ge=0, description="gid the jailed firecracker runs as")
    kernel: Path | None = Field(None, description="guest kernel (an uncompressed vmlinux); default: the newest "
                                "one 'nimbus images kernel' made")
    snapshots: Literal["on", "off"] = Field("off", description="on: restore cold starts from a per-runtime "
                                            "snapshot instead of booting (driver firecracker)")
    advertise_url: str = Field("", pattern=r"^(https?://[^/\s]+)?$", description="the address other nodes and "
                               "operators reach this node at, shown by nimbus nodes (default: http://host:port)")
    heartbeat_s: float = Field(2.0, gt=0, le=60, description="how often the node renews its row in the node "
                               "registry and looks for dead nodes")
    node_dead_s: float = Field(10.0, gt=0, le=3600, description="a node whose last heartbeat is older than this "
                               "is dead: its async work is taken over at once by the live nodes")
    drain_s: float = Field(0.0, ge=0, le=600, description="on SIGTERM, how long /health answers 503 (draining) "
                           "while calls are still served, so the load balancer stops sending work before the "
                           "node stops listening")
    notify: Literal["on", "off"] = Field("on", description="PostgreSQL only: LISTEN/NOTIFY tells every node of "
                                         "changes (caches, machines, revoked keys) and of new async work at once; "
                                         "off: they are seen within function_cache_s and async_poll_s")
    log_level: str = "info"
    account_id: str = Field("000000000000", pattern=r"^[0-9]{12}$", description="the twelve-digit account "
                            "functions see in their ARN (context.invoked_function_arn)")
    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$", description="the region functions "
                        "see in their ARN and in AWS_REGION")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_toml_path()))

    @field_validator("runtimes", mode="before")
    @classmethod
    def _split_runtimes(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            # Blank machines are kept per canonical id: "provided.al2023" pre-warms what provided functions use.
            canonical = [_canonical_runtime(part) if isinstance(part, str) else part for part in value]
            return list(dict.fromkeys(canonical))
        return value

    @model_validator(mode="after")
    def _warm_bounds(self) -> "Settings":
        if self.max_warm < self.min_warm:
            raise ValueError(f"NIMBUS_MAX_WARM ({self.max_warm}) must be at least NIMBUS_MIN_WARM ({self.min_warm})")
        return self

    @model_validator(mode="after")
    def _process_budgets(self) -> "Settings":
        # Each worker process needs a machine and a uid of its own: the split budgets must not round to 0.
        for name in ("max_machines", "machine_uid_count"):
            if getattr(self, name) < self.processes:
                raise ValueError(f"NIMBUS_{name.upper()} ({getattr(self, name)}) must be at least NIMBUS_PROCESSES "
                                 f"({self.processes}): it is split between the worker processes")
        return self

    @property
    def process_index(self) -> int:
        """Which worker process of the node these settings are for (0 unless ``nimbus.processes`` set it)."""
        return self._process_index

    @model_validator(mode="after")
    def _refuse_open_without_auth(self) -> "Settings":
        if self.auth == "off" and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host} with NIMBUS_AUTH=off: anyone who can reach it could run code; "
                "bind 127.0.0.1 or set NIMBUS_AUTH=on"
            )
        return self

    @property
    def db_url(self) -> str:
        """The database URL with its async driver (aiosqlite or asyncpg)."""
        # The store's one normaliser; imported here so SQLAlchemy loads only when a URL is asked for.
        from nimbus.errors import StoreError
        from nimbus.store.database import normalise_url

        url = self.database_url or f"sqlite:///{(self.home / 'nimbus.db').resolve()}"
        try:
            return normalise_url(url).render_as_string(hide_password=False)
        except (StoreError, ValueError):
            return url  # not a database Nimbus runs on: Store.open says so when the node starts


def _canonical_runtime(name: str) -> str:
    """A runtime's canonical id; an unknown name as given (the driver's checks name it)."""
    try:
        return runtimes.normalise(name)
    except InvalidRequest:
        return name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
