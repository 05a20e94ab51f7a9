"""Command-line tools, run as modules: `python -m tools.NAME --help`."""
