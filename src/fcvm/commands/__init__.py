"""fcvm.commands."""
