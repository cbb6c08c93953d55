"""The ``jserve`` command line."""
