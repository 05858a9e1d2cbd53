"""``python -m raybatch.server``: one process that owns the store, runs the
scheduler loop in a thread and serves the REST API with uvicorn.

    python -m raybatch.server --state-dir DIR --ray-address HOST:PORT \\
        --dashboard-url http://HOST:PORT [--host 127.0.0.1] [--port 8765] \\
        [--policy FILE] [--cluster-config ray-cluster.yaml] [--datastores FILE] \
        [--jobs-root PATH-OR-URI] [--cache-dir DIR] [--tls-cert PEM --tls-key PEM]

The scheduler policy (backfill, preemption, fair share, quotas) is read from
``--policy`` (default ``<state dir>/policy.yaml``) and re-read when it changes.
With ``--cluster-config`` (the Ray autoscaler's cluster YAML), the scheduler
asks Ray's autoscaler for the nodes queued jobs need, and rejects at submit a
job that even the largest cluster could not hold.

Datastores (named storage locations and their credential references, see
docs/storage.md) are read from ``--datastores`` (default ``<state dir>/datastores.yaml``)
and re-read when it changes. ``--cache-dir`` is where each node keeps its cache of
downloaded inputs (default ``$RAYBATCH_CACHE_DIR`` or ``~/.cache/raybatch``).
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from raybatch.config import ServerSettings, ray_client_env

log = logging.getLogger("raybatch.server")


class ClusterConfigWatcher:
    """Re-reads ``--cluster-config`` when its mtime changes (``raybatch cluster scale``
    rewrites it): the autoscaling demand then plans with the new node types and limits.
    A file that does not parse is logged and the previous types are kept."""

    def __init__(self, path: Path, demand) -> None:
        import yaml  # noqa: PLC0415

        self.path, self.demand = path, demand
        self._mtime = path.stat().st_mtime
        self.config = yaml.safe_load(path.read_text()) or {}
        self.error: str | None = None

    def current(self) -> dict:
        return self.config

    def __call__(self, _scheduler=None) -> None:
        import yaml  # noqa: PLC0415

        from raybatch.scheduler.autoscale import NodeTypes  # noqa: PLC0415

        try:
            mtime = self.path.stat().st_mtime
        except OSError as e:
            mtime = None
            if self.error is None:
                self.error = f"{self.path}: {e}"
                log.error("cluster config unreadable: %s (keeping the previous one)", self.error)
            return
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            config = yaml.safe_load(self.path.read_text()) or {}
            if not isinstance(config, dict):
                raise ValueError(f"{self.path}: not a mapping")
            types = NodeTypes.from_config(config, source=str(self.path))
        except (OSError, ValueError, yaml.YAMLError) as e:
            self.error = str(e)
            log.error("cluster config %s: %s (keeping the previous one)", self.path, e)
            return
        self.demand.types, self.config, self.error = types, config, None
        log.info("cluster config reloaded from %s: %s", self.path,
                 ", ".join(f"{t.name} max {t.max_workers}" for t in types.types.values()))


def build(state_dir: Path, ray_address: str, dashboard_url: str, jobs_root: str | Path | None = None,
          tick: float = 0.5, policy_file: Path | None = None, cluster_config: Path | None = None,
          datastores_file: Path | None = None, cache_dir: str | None = None):
    from raybatch.runtime.launcher import RayJobLauncher  # noqa: PLC0415
    from raybatch.scheduler.cluster import RayClusterView  # noqa: PLC0415
    from raybatch.scheduler.loop import Scheduler  # noqa: PLC0415
    from raybatch.server.app import ServerContext, create_app  # noqa: PLC0415
    from raybatch.server.auth import ensure_token  # noqa: PLC0415
    from raybatch.spec.location import LocationError, parse  # noqa: PLC0415
    from raybatch.state.store import Store  # noqa: PLC0415
    from raybatch.storage.datastores import DatastoresFileWatcher  # noqa: PLC0415
    from raybatch.private_dir import tighten_state_dir  # noqa: PLC0415

    ray_client_env()
    state_dir.mkdir(parents=True, exist_ok=True)
    tighten_state_dir(state_dir)  # 0700/0600, also what an older version left readable (runtime/private_dir.py)
    token = ensure_token(state_dir / "token")
    store = Store(state_dir / "raybatch.db")
    code_root = state_dir / "code"
    code_root.mkdir(exist_ok=True)
    autoscaler = None
    watcher = None
    if cluster_config is not None:
        from raybatch.scheduler.autoscale import Demand, NodeTypes  # noqa: PLC0415

        autoscaler = Demand(NodeTypes.from_cluster_yaml(cluster_config), ray_address)
        watcher = ClusterConfigWatcher(Path(cluster_config), autoscaler)
    datastores = DatastoresFileWatcher(datastores_file or state_dir / "datastores.yaml")
    datastores()
    if datastores.error:
        raise SystemExit(datastores.error)
    launcher = RayJobLauncher(dashboard_url, state_dir, code_root, datastores=datastores,
                              settings=ServerSettings.from_env(cache_dir), ray_address=ray_address)
    root = str(jobs_root or state_dir / "jobs")
    try:
        root_loc = parse(root)
        datastores().check(root)
    except LocationError as e:
        raise SystemExit(f"--jobs-root: {e}")
    scheduler = Scheduler(store, launcher,
                          RayClusterView(ray_address), tick=tick,
                          policy_file=policy_file or state_dir / "policy.yaml", autoscaler=autoscaler)
    scheduler.load_policy()
    if scheduler.policy_error:
        raise SystemExit(scheduler.policy_error)
    launcher.vault_problem = lambda workspace, vault: scheduler.policy.vault_problem(workspace, vault)
    stranded = store.requeue_stranded()  # a chain a crash left half done goes on to QUEUED
    if stranded:
        log.warning("requeued %d job(s) left RESTARTING or PREEMPTED: %s", len(stranded), ", ".join(stranded[:20]))
    from raybatch.scheduler.nodes import NodeRecorder  # noqa: PLC0415

    if watcher is not None:
        scheduler.cycle_hooks.append(watcher)
    scheduler.cycle_hooks.append(NodeRecorder(store, ray_address, config=watcher.current if watcher else None))
    ctx = ServerContext(store=store, scheduler=scheduler,
                        jobs_root=str(Path(root_loc.path).resolve()) if root_loc.is_local else root_loc.uri,
                        code_root=code_root, datastores=datastores)
    app = create_app(ctx, token)
    app.state.metrics.start()  # /metrics: tail running jobs' metrics, read the store's history once
    return app, scheduler


def tls_options(cert: Path | None, key: Path | None) -> dict:
    """uvicorn's TLS arguments: both files or neither (plain HTTP stays possible, e.g. on
    127.0.0.1 for Ray tasks of the cluster); a file that is missing stops the server here
    rather than at its first connection."""
    if (cert is None) != (key is None):
        raise SystemExit("--tls-cert and --tls-key go together (the certificate and its private key)")
    if cert is None:
        return {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


ADDRESS_FILE = "server.json"


def record_address(state_dir: Path, host: str, port: int, tls_cert: Path | None) -> None:
    """Write the URL this server answers on (and its TLS certificate, which clients of a
    self-signed one verify it with) beside its token (``<state dir>/server.json``): the SDK
    sends the token file of a state dir only to that address (raybatch.client)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # every address: this machine reaches it on loopback
    url = f"{'https' if tls_cert else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
    record = {"url": url, "ca_cert": str(tls_cert.resolve()) if tls_cert else None}
    tmp = state_dir / f".{ADDRESS_FILE}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, state_dir / ADDRESS_FILE)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m raybatch.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", required=True, type=Path, help="store, token, code packages")
    p.add_argument("--ray-address", required=True, help="the Ray cluster's GCS address host:port")
    p.add_argument("--dashboard-url", required=True, help="the Ray dashboard, for Ray Jobs")
    p.add_argument("--jobs-root", help="default root of job directories: a path, or a blob location "
                   "(az://..., datastore://name/path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--tick", type=float, default=0.5, help="scheduler period in seconds")
    p.add_argument("--policy", type=Path, help="scheduler policy file (default: <state dir>/policy.yaml)")
    p.add_argument("--cluster-config", type=Path,
                   help="the Ray autoscaler's cluster YAML: enables autoscaling demand")
    p.add_argument("--datastores", type=Path, help="datastores file (default: <state dir>/datastores.yaml)")
    p.add_argument("--cache-dir", help="each node's input cache (default: $RAYBATCH_CACHE_DIR or ~/.cache/raybatch)")
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM; with --tls-cert)")
    args = p.parse_args(argv)
    from raybatch.private_dir import PRIVATE_UMASK  # noqa: PLC0415
    import os  # noqa: PLC0415

    os.umask(PRIVATE_UMASK)  # raybatch.db (+WAL), code packages, attempt files: the server's user's alone
    tls = tls_options(args.tls_cert, args.tls_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn  # noqa: PLC0415

    app, scheduler = build(args.state_dir.resolve(), args.ray_address, args.dashboard_url,
                           args.jobs_root, args.tick, args.policy, args.cluster_config,
                           args.datastores, args.cache_dir)
    record_address(args.state_dir.resolve(), args.host, args.port, args.tls_cert)
    loop = threading.Thread(target=scheduler.run_forever, name="scheduler", daemon=True)
    loop.start()
    try:
        # proxy_headers off: uvicorn would otherwise take X-Forwarded-For/-Proto from any
        # loopback client (every user of the SSH tunnel), forging the audit log's address
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False, **tls)
    finally:
        scheduler.stop()
        loop.join(timeout=5)


if __name__ == "__main__":
    main()
