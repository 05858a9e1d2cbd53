"""Deciding what runs where. The loop reads as nominate -> fit -> admit:
``queue`` orders the waiting jobs, ``fit`` places a gang on a snapshot of the
live nodes, ``loop`` admits, watches and ends attempts."""
