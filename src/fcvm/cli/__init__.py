"""Argument parsing only: argv becomes a call on a `fcvm.commands` module."""
