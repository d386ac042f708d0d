"""fcvm.fusepipe."""
