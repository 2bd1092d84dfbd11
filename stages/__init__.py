"""Thin command-line entry points, one per pipeline stage: `python -m stages.<name> --help`."""
