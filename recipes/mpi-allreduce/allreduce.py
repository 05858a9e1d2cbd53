"""Data-parallel softmax regression on scikit-learn's digits with mpi4py: every MPI
process computes the gradient on its shard, MPI.Allreduce sums them, every process
applies the same update. Also checks one known allreduce (the sum of 1..size).

Runs the same under raybatch (framework: mpi) and under a plain
``mpirun -np 2 python allreduce.py``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    print(f"rank {rank}/{size} on host {socket.gethostname()} raybatch node "
          f"{os.environ.get('RAYBATCH_NODE_RANK', '-')} pid {os.getpid()}", flush=True)

    total = comm.allreduce(rank + 1, op=MPI.SUM)
    if rank == 0:
        print(f"allreduce sum: {total} (expected {size * (size + 1) // 2})", flush=True)

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order] / 16.0, y[order]
    split = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    shard = slice(rank, None, size)  # this process's share of the training set
    xs, ys = x_train[shard], np.eye(10)[y_train[shard]]
    w = np.zeros((x.shape[1], 10))
    b = np.zeros(10)
    t0 = time.time()
    for epoch in range(args.epochs):
        logits = xs @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        local = np.concatenate([(xs.T @ (p - ys)).ravel(), (p - ys).sum(axis=0)])
        grad = np.empty_like(local)
        comm.Allreduce(local, grad, op=MPI.SUM)  # summed over every process's shard
        grad /= len(x_train)
        w -= args.lr * grad[:-10].reshape(w.shape)
        b -= args.lr * grad[-10:]
        if rank == 0 and (epoch + 1) % 100 == 0:
            print(f"epoch {epoch + 1}: {time.time() - t0:.1f}s", flush=True)
    acc = float(((x_test @ w + b).argmax(axis=1) == y_test).mean())
    # every process holds the same weights: their checksums must agree
    sums = comm.gather(float(np.abs(w).sum()), root=0)
    nodes = comm.gather(os.environ.get("RAYBATCH_NODE_RANK", "-"), root=0)
    if rank == 0:
        print(f"test accuracy: {acc:.4f}", flush=True)
        print(f"weights identical on all ranks: {max(sums) - min(sums) < 1e-9}", flush=True)
        out = os.environ.get("RAYBATCH_OUTPUT_RESULT") or os.environ.get("AZ_BATCHAI_OUTPUT_RESULT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "result.json").write_text(json.dumps(
                {"size": size, "allreduce_sum": total, "test_accuracy": acc, "nodes": nodes}))


if __name__ == "__main__":
    main()
