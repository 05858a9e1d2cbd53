"""The ``raybatch`` command line (typer)."""
