"""Modules a rank's process can import without raybatch installed: this directory is on
every rank's PYTHONPATH (``raybatch_metrics``). Stdlib only."""
