"""Domain helpers: pure types with no I/O."""
