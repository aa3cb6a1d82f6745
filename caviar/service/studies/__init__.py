"""Studies: create, read, list, pause and resume; the queue order workers take them in."""
