"""The azurite fixture: a real blob service whose data outlives stop() and start()."""

from __future__ import annotations

import pytest
from azure.core.exceptions import AzureError


def test_blob_round_trip_survives_restart(azurite):
    container = azurite.create_container("fixture-check")
    container.upload_blob("a/b.txt", b"hello azurite", overwrite=True)
    assert container.download_blob("a/b.txt").readall() == b"hello azurite"
    port = azurite.port

    azurite.stop()
    fast = azurite.service_client(retry_total=0, connection_timeout=2, read_timeout=2)
    with pytest.raises(AzureError):
        fast.get_container_client("fixture-check").download_blob("a/b.txt").readall()

    azurite.start()
    assert azurite.port == port
    again = azurite.service_client().get_container_client("fixture-check")
    assert again.download_blob("a/b.txt").readall() == b"hello azurite"
    assert [b.name for b in again.list_blobs()] == ["a/b.txt"]
