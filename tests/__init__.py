"""The test suite; `tests.servers` starts the real servers the tests talk to."""
