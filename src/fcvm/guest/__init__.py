"""fcvm.guest."""
