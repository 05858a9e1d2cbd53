"""The raybatch server: REST API + scheduler loop + state store, one process."""
