"""The values the host and the guest agent must agree on, defined once.

It lives in the agent because the agent may import nothing of the host but ``nimbus.protocol``; the
host (machines, scheduler, build sandbox) imports it from here. Plain constants: every cold start
imports this module.
"""

# Limits of one call.
INIT_TIMEOUT_S = 10.0  # the least time the host gives a machine to load its code (the function's timeout if longer)
RESULT_MAX = 6 << 20  # a result's JSON bytes, as Lambda's synchronous response limit
LOG_TAIL_MAX = 64 << 10  # bytes of a call's output kept (its tail)

# The guest's file system: the same paths in a bwrap sandbox and in a Firecracker guest.
OPT_DIR = "/opt/nimbus"  # Nimbus's own files: the agent at OPT_DIR/nimbus, the wasmtime package below
WASMTIME_SITE = f"{OPT_DIR}/site"  # the agent's wasm runtime puts it on its path
TASK_DIR = "/var/task"  # the function's code, on a tmpfs
TASK_DIR_MB = 256  # the size of that tmpfs (unpacked code, as Lambda's 250 MB)
# Where a machine sees its function's dependency layer, read-only: the one value the Init header's
# "layer" may have.
LAYER_DIR = "/opt/layer"
# Where node's upward node_modules search from inside the layer (/opt/layer/<pkg>/…) looks next: a link
# to the layer itself, so a layer package finds its siblings as it did in its own node_modules.
LAYER_MODULES_LINK = "/opt/node_modules"
# Where a machine sees the AWS SDK its runtime bundles (nimbus.compiler.sdk), read-only: the one value the
# Init header's "sdk" may have for that runtime. Python appends its directory to sys.path after the layer;
# node finds /node_modules last when it walks up from any file, from CommonJS and ES modules alike.
SDK_DIRS = {"python3": "/opt/sdk/python", "nodejs": "/node_modules"}
# Kernel facts /proc would show every function: /dev/null is bound over those the host has.
PROC_HIDDEN = ("config.gz", "kallsyms", "modules", "keys", "key-users", "timer_list", "sched_debug", "kcore")

# Who the function runs as, and with what environment.
SANDBOX_UID = 65534  # nobody, in a machine's user namespace (and the build sandbox's)
SANDBOX_GID = 65534
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}

# Channels.
VSOCK_PORT = 9999  # the guest port a Firecracker guest's agent listens on
TEMPLATE_MESSAGE_MAX = 64 << 10  # one message on a bwrap template's control channel
