"""The ``regproxy`` command line: one module per command, each parsing options and calling the library."""
