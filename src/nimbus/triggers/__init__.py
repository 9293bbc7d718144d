"""What starts an invocation besides an API call: schedules (EventBridge's grammar and the per-node tick loop).

Above the store and beside the scheduler: the tick loop only writes queued async invocations through the
store, and the async worker of whichever node claims them runs them, so a schedule needs no machine of
its own and no node is special.
"""
