"""fcvm.channel."""
