"""``raybatch spot-watch``: on a spot node, drain this node's raylet for preemption when
Azure schedules its eviction (raybatch.cluster.spot_watch). The spot node types of the
cluster YAMLs start it after ``ray start``; it runs until killed."""

from __future__ import annotations

import os
from typing import Optional

import typer


def spot_watch(
    gcs_address: Optional[str] = typer.Option(None, "--gcs-address", help="The Ray cluster's GCS, host:port "
                                              "(default: $RAY_ADDRESS)."),
    imds_url: str = typer.Option("http://169.254.169.254", "--imds-url",
                                 help="Azure's Instance Metadata Service (a test serves its own)."),
    poll_s: float = typer.Option(1.0, "--poll-s", min=0.1, help="Seconds between two polls of Scheduled Events."),
    node_id: Optional[str] = typer.Option(None, "--node-id", help="This node's Ray node id (hex), when the "
                                          "GCS cannot tell it by this machine's address."),
) -> None:
    """Poll Azure Scheduled Events; on a Preempt of this VM, drain its Ray node with the
    eviction's NotBefore as the deadline (once per event; the event is never acknowledged)."""
    from raybatch.cluster import spot_watch as sw  # noqa: PLC0415
    from raybatch.scheduler.cluster import gcs_client  # noqa: PLC0415

    address = gcs_address or os.environ.get("RAY_ADDRESS")
    if not address:
        sw._log("error: no GCS address: pass --gcs-address HOST:PORT or set RAY_ADDRESS")
        raise typer.Exit(2)
    imds = sw.Imds(imds_url)
    try:
        gcs = gcs_client(address)
        vm_name = imds.vm_name()
        me = node_id or sw.own_node_id(gcs, address)
    except sw.WatchError as e:
        sw._log(f"error: {e}")
        raise typer.Exit(1)
    except OSError as e:
        sw._log(f"error: Azure Instance Metadata Service at {imds_url}: {e}")
        raise typer.Exit(1)
    watcher = sw.SpotWatcher(imds, sw.drain_via_gcs(gcs), me, vm_name)
    try:
        watcher.run(poll_s)
    except KeyboardInterrupt:
        pass
