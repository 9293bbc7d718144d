"""Many nodes on one PostgreSQL database: the node registry, change notifications, and the load balancer's
configuration. A single node runs the same code; on SQLite it is simply a cluster of one."""
