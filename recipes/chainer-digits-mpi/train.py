"""ChainerMN data-parallel training of a small MLP on scikit-learn's digits.

Every MPI process gets a shard of the training set (``chainermn.scatter_dataset``),
the multi-node optimizer averages the gradients over the communicator at each step,
and rank 0 evaluates on the held-out split. Runs the same under raybatch
(framework: chainer) and under a plain ``mpirun -np 2 python train.py``."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
import chainermn  # noqa: E402
import numpy as np  # noqa: E402
from chainer.dataset import concat_examples  # noqa: E402


class MLP(chainer.Chain):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(None, hidden)
            self.l2 = L.Linear(hidden, hidden)
            self.l3 = L.Linear(hidden, out)

    def forward(self, x):
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def load_split(seed: int = 0):
    """Standardised digits, a fixed 80/20 split (the same on every process)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int32)
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(axis=0), x[:split].std(axis=0) + 1e-6
    x = (x - mean) / std
    return (x[:split], y[:split]), (x[split:], y[split:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's alpha")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--communicator",
                    default=os.environ.get("RAYBATCH_CHAINERMN_COMMUNICATOR", "naive"),
                    help="ChainerMN communicator; 'naive' works on CPUs (default)")
    args = ap.parse_args()

    comm = chainermn.create_communicator(args.communicator)
    rank, size = comm.rank, comm.size
    print(f"rank {rank}/{size} on host {socket.gethostname()} raybatch node "
          f"{os.environ.get('RAYBATCH_NODE_RANK', '-')} pid {os.getpid()} "
          f"(chainer {chainer.__version__}, numpy {np.__version__})", flush=True)

    (x_train, y_train), (x_test, y_test) = load_split()
    train = chainer.datasets.TupleDataset(x_train, y_train) if rank == 0 else None
    # rank 0 splits the training set into `size` equal shards and sends one to each process
    train = chainermn.scatter_dataset(train, comm, shuffle=True, seed=0)

    chainer.config.train = True
    model = L.Classifier(MLP(args.hidden, 10))
    optimizer = chainermn.create_multi_node_optimizer(chainer.optimizers.Adam(alpha=args.lr), comm)
    optimizer.setup(model)  # the first update broadcasts rank 0's initial weights

    # every shard has the same length: every process makes the same number of updates
    steps = (len(train) + args.batch_size - 1) // args.batch_size
    rng = np.random.default_rng(rank)
    t0 = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for step in range(steps):
            batch = [train[int(i)] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
            x, t = concat_examples(batch)
            loss = model(x, t)
            model.cleargrads()
            loss.backward()
            optimizer.update()  # gradients averaged over every process
            total += float(loss.array)
        mean_loss = comm.allreduce_obj(total / steps) / size
        if rank == 0 and ((epoch + 1) % 5 == 0 or epoch == 0):
            print(f"epoch {epoch + 1}: loss {mean_loss:.4f} ({time.time() - t0:.1f}s)", flush=True)

    with chainer.using_config("train", False), chainer.no_backprop_mode():
        acc = float(F.accuracy(model.predictor(x_test), y_test).array)
    # every process holds the same weights: their checksums must agree
    sums = comm.gather_obj(float(sum(np.abs(p.array).sum() for p in model.params())))
    nodes = comm.gather_obj(os.environ.get("RAYBATCH_NODE_RANK", "-"))
    if rank == 0:
        print(f"test accuracy: {acc:.4f}", flush=True)
        print(f"weights identical on all ranks: {max(sums) - min(sums) < 1e-3}", flush=True)
        out = os.environ.get("RAYBATCH_OUTPUT_RESULT") or os.environ.get("AZ_BATCHAI_OUTPUT_RESULT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "result.json").write_text(json.dumps({
                "size": size, "test_accuracy": acc, "nodes": nodes, "communicator": args.communicator,
                "chainer": chainer.__version__, "numpy": np.__version__, "epochs": args.epochs,
            }))


if __name__ == "__main__":
    main()
