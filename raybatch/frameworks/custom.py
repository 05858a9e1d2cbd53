"""framework: custom — any shell command, run by every rank (Batch AI's
customToolkitSettings ran it on the first node; use nodes: 1 for that)."""

from raybatch.frameworks.base import Framework


class CustomFramework(Framework):
    name = "custom"
