"""The run path: a request, its supervisor (create -> supervise -> teardown), the agent link, cleanup."""
