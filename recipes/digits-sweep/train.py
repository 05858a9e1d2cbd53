"""One trial of the digits sweep: a scikit-learn MLP on the bundled digits data (no
download), trained epoch by epoch with a given learning rate and hidden width. After each
epoch it reports the test accuracy and checkpoints the model, so a trial that is stopped
(preempted, early terminated) and run again resumes where it was.

    python train.py --lr 0.003 --hidden 64 [--epochs 12] [--mlflow] [--sleep-per-epoch S]

It reports with ``raybatch_metrics.log_metric`` (stdlib only, on every raybatch rank's
PYTHONPATH), or with ``mlflow.log_metric`` (``--mlflow``: how Azure ML sweep scripts
report); outside raybatch both just print."""

import argparse
import os
import pickle
import signal
import sys
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

STOP = []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--mlflow", action="store_true", help="report with mlflow.log_metric")
    p.add_argument("--sleep-per-epoch", type=float, default=0.0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: STOP.append(1))
    if args.mlflow:
        import mlflow

        report = lambda name, value, step: mlflow.log_metric(name, value, step=step)  # noqa: E731
    else:
        try:
            from raybatch_metrics import log_metric
        except ImportError:  # outside raybatch
            def log_metric(name, value, step=None):
                print(f"{name}={value} step={step}")
        report = lambda name, value, step: log_metric(name, value, step=step)  # noqa: E731

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    ckpt_dir = os.environ.get("RAYBATCH_CHECKPOINT_DIR", "./checkpoints")
    ckpt = os.path.join(ckpt_dir, "model.pkl")
    start = 0
    model = MLPClassifier(hidden_layer_sizes=(args.hidden,), learning_rate_init=args.lr, random_state=0)
    if os.path.exists(ckpt):
        with open(ckpt, "rb") as f:
            start, model = pickle.load(f)
        print(f"resumed from checkpoint at epoch {start}", flush=True)
    classes = np.unique(y)
    for epoch in range(start, args.epochs):
        model.partial_fit(x_train, y_train, classes=classes)
        accuracy = model.score(x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs} accuracy {accuracy:.4f}", flush=True)
        report("accuracy", accuracy, epoch + 1)
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(ckpt + ".tmp", "wb") as f:
            pickle.dump((epoch + 1, model), f)
        os.replace(ckpt + ".tmp", ckpt)
        if STOP:
            print(f"SIGTERM: checkpoint saved at epoch {epoch + 1}", flush=True)
            return 143
        time.sleep(args.sleep_per_epoch)
    out = os.environ.get("RAYBATCH_OUTPUT_MODEL")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "model.pkl"), "wb") as f:
            pickle.dump(model, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
