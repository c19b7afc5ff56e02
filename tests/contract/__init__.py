"""Contract suite: the same scenarios against every backend (arrives with the Backend protocol)."""
