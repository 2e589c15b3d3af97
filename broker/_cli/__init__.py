"""The `busway` command line."""
