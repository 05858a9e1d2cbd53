"""The embedded local default: a Ray cluster of several local nodes plus the
raybatch server, started in the background under RAYBATCH_HOME."""
