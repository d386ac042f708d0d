"""fcvm.uffd."""
