"""One module per user command. Each composes the layers below and returns an exit code."""
