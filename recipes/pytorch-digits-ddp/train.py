"""PyTorch DistributedDataParallel (gloo, CPU) on scikit-learn's digits data set.

Reads the rendezvous from the environment exactly as torchrun sets it
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the same script
runs under `raybatch`, under `torchrun --nnodes 1 --nproc-per-node 2 train.py`,
or as a plain single process (`python train.py`, WORLD_SIZE unset or 1).

Checkpoints every epoch (rank 0, atomically) and resumes from the last one.
On SIGTERM it finishes the current epoch, writes the checkpoint and exits 143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

SEED = 0
CHECKPOINT_NAME = "checkpoint.pt"
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM

_stop_requested = False


def _on_sigterm(signum, frame):  # noqa: ARG001
    # Only set a flag: the training loop checks it at the end of the epoch,
    # after the checkpoint, so that all ranks stop at the same point.
    global _stop_requested
    _stop_requested = True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="total number of epochs (default 30)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per rank (default 32)")
    p.add_argument(
        "--checkpoint-dir",
        default=os.environ.get("RAYBATCH_CHECKPOINT_DIR") or "./checkpoints",
        help="where checkpoint.pt goes (default: $RAYBATCH_CHECKPOINT_DIR, else ./checkpoints)",
    )
    p.add_argument(
        "--model-dir",
        default=os.environ.get("RAYBATCH_OUTPUT_MODEL") or "./outputs",
        help="where model.pt and metrics.json go (default: $RAYBATCH_OUTPUT_MODEL, else ./outputs)",
    )
    p.add_argument(
        "--sleep-per-epoch",
        type=float,
        default=0.0,
        help="seconds to sleep after each epoch (to make a run long enough to cancel or preempt)",
    )
    return p.parse_args(argv)


class MLP(nn.Module):
    def __init__(self, n_in=64, hidden=128, n_out=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x):
        return self.net(x)


def load_data():
    """Fixed-seed, stratified 80/20 split of the bundled digits data, standardised; and
    the standardisation (saved with the model: recipes/batch-scoring applies it)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=SEED, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train).astype(np.float32)
    x_test = scaler.transform(x_test).astype(np.float32)
    return (
        TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
        {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()},
    )


def save_checkpoint(path, model, optimizer, epoch):
    """Write to a temp file in the same directory, then rename over the old one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(
                {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.set_num_threads(1)

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # LOCAL_RANK would pick a GPU; on CPU with gloo it is only read for completeness.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # noqa: F841
    print(
        f"rank {rank}/{world_size} on host {socket.gethostname()} pid {os.getpid()}", flush=True
    )

    # One process with no rendezvous address: run plain, no process group.
    # Otherwise (WORLD_SIZE > 1, or torchrun with one process) use gloo via env://.
    distributed = world_size > 1 or ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)
    if distributed:
        dist.init_process_group(backend="gloo", init_method="env://")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    def log(msg):
        if is_main:
            print(msg, flush=True)

    torch.manual_seed(SEED)
    train_set, test_set, preprocess = load_data()
    sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=SEED
    )
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    # Resume. Rank 0 reads the checkpoint and hands it to every rank, so all
    # ranks load the same state even when only rank 0 sees the directory.
    ckpt_path = os.path.join(args.checkpoint_dir, CHECKPOINT_NAME)
    state = None
    if is_main and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if distributed:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        log(f"resumed from checkpoint at epoch {start_epoch}")
    else:
        log("starting from scratch")
    del state

    # DDP broadcasts rank 0's parameters at construction and averages gradients.
    ddp_model = DDP(model) if distributed else model

    for epoch in range(start_epoch + 1, args.epochs + 1):
        sampler.set_epoch(epoch)
        ddp_model.train()
        total = torch.zeros(2, dtype=torch.float64)  # [sum of losses, number of samples]
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp_model(xb), yb)
            loss.backward()
            optimizer.step()
            total[0] += loss.item() * len(yb)
            total[1] += len(yb)
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        log(f"epoch {epoch}/{args.epochs} loss {total[0].item() / max(total[1].item(), 1):.4f}")

        if args.sleep_per_epoch > 0:
            time.sleep(args.sleep_per_epoch)

        if is_main:
            save_checkpoint(ckpt_path, model, optimizer, epoch)
        stop = torch.tensor([1 if _stop_requested else 0], dtype=torch.int32)
        if distributed:
            dist.barrier()
            # Every rank must take the same decision, or one would hang in the
            # next collective: stop if any rank got SIGTERM.
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            log(f"SIGTERM received: checkpoint saved at epoch {epoch}, exiting")
            if distributed:
                dist.destroy_process_group()
            # os._exit rather than sys.exit: during interpreter shutdown Python
            # restores the default SIGTERM action, and a launcher that signals
            # the remaining ranks as soon as one exits (torchrun does) would
            # then kill this one with -15 instead of letting it exit 143.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_SIGTERM)

    if is_main:
        model.eval()
        with torch.no_grad():
            x_test, y_test = test_set.tensors
            accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
        print(f"test accuracy: {accuracy:.4f}", flush=True)
        os.makedirs(args.model_dir, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.model_dir, "model.pt"))
        with open(os.path.join(args.model_dir, "preprocess.json"), "w") as f:
            json.dump(preprocess, f)
        metrics = {
            "test_accuracy": round(accuracy, 4),
            "epochs": args.epochs,
            "world_size": world_size,
            "resumed_from_epoch": start_epoch if start_epoch > 0 else None,
        }
        with open(os.path.join(args.model_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")

    if distributed:
        # Wait for rank 0's evaluation before tearing down: a rank that destroys
        # the gloo group and exits while its peer still holds the connection can
        # abort in gloo's C++ teardown ("terminate called without an active
        # exception", exit 134).
        dist.barrier()
        dist.destroy_process_group()
        # ... and the barrier does not rule it out: rank 0 (the store's host) can exit
        # while a peer is still in its own teardown, whose C++ destructors then abort
        # (seen on a loaded CI machine: rank 1 exit 134 after a finished run). Nothing is
        # left to do: end without running them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
