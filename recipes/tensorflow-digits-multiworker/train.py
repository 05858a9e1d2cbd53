"""Keras + tf.distribute.MultiWorkerMirroredStrategy (CPU) on scikit-learn's digits data set.

Reads the cluster from TF_CONFIG, as every TensorFlow multi-worker launcher sets it
({"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}), so the same
script runs under `raybatch` (framework: tensorflow), under processes started by hand
with their own TF_CONFIG, or as a plain single process (`python train.py`, no TF_CONFIG).

Worker 0 (or a task of type "chief") is the chief: it prints the test accuracy and
writes the model and metrics.json to --model-dir; the other workers save to a temporary
directory that they remove (the standard TensorFlow multi-worker saving pattern: every
worker takes part in saving, only the chief's copy is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time

SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="number of epochs (default 20)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per worker (default 32)")
    p.add_argument(
        "--model-dir",
        default=os.environ.get("RAYBATCH_OUTPUT_MODEL") or "./outputs",
        help="where model.keras and metrics.json go (default: $RAYBATCH_OUTPUT_MODEL, else ./outputs)",
    )
    return p.parse_args(argv)


def cluster_from_env():
    """(task type, task index, number of workers, is chief) from TF_CONFIG."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    task_type, task_index = task.get("type", "worker"), int(task.get("index", 0))
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    is_chief = task_type == "chief" or (task_type == "worker" and task_index == 0 and "chief" not in cluster)
    return task_type, task_index, max(1, workers), is_chief


def load_data():
    """Fixed-seed, stratified 80/20 split of the bundled digits data, standardised."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    scaler = StandardScaler().fit(x_train)
    return (scaler.transform(x_train).astype(np.float32), y_train.astype(np.int64),
            scaler.transform(x_test).astype(np.float32), y_test.astype(np.int64))


def main(argv=None):
    args = parse_args(argv)
    task_type, task_index, num_workers, is_chief = cluster_from_env()
    print(f"{task_type} {task_index} of {num_workers} on host {socket.gethostname()} pid {os.getpid()}",
          flush=True)

    import keras
    import tensorflow as tf

    # The strategy must exist before any other TensorFlow op: it starts this task's server.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(SEED)  # the same initial weights on every worker

    x_train, y_train, x_test, y_test = load_data()
    global_batch = args.batch_size * strategy.num_replicas_in_sync
    options = tf.data.Options()
    # an in-memory data set has no files to shard: each worker keeps its share of every batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=SEED, reshuffle_each_iteration=True)
             .batch(global_batch, drop_remainder=True).repeat().with_options(options))
    steps_per_epoch = len(x_train) // global_batch  # the same on every worker
    batches = iter(strategy.experimental_distribute_dataset(train))

    with strategy.scope():
        model = keras.Sequential([
            keras.Input(shape=(64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])
        optimizer = keras.optimizers.Adam(args.lr)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    # A custom loop, not model.fit: Keras 3's fit fails under MultiWorkerMirroredStrategy
    # with more than one worker (keras-team/keras#20585). The optimizer all-reduces
    # (sums) the gradients across replicas, so each replica's loss is scaled by the
    # global batch size.
    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                per_example = loss_fn(y, model(x, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        x, y = next(iterator)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y)), axis=None)

    t0 = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for _ in range(steps_per_epoch):
            total += float(train_step(batches))
        if is_chief:
            print(f"epoch {epoch}/{args.epochs} loss {total / steps_per_epoch:.4f}", flush=True)
    train_seconds = time.monotonic() - t0

    # the replicas hold the same weights: every worker can evaluate locally
    logits = model(x_test, training=False)
    accuracy = float((tf.argmax(logits, axis=1).numpy() == y_test).mean())

    # every worker saves (saving may take part in collectives); only the chief's copy is kept
    model_dir = args.model_dir if is_chief else tempfile.mkdtemp(prefix=f"{task_type}-{task_index}-")
    os.makedirs(model_dir, exist_ok=True)
    model.save(os.path.join(model_dir, "model.keras"))
    if is_chief:
        print(f"test accuracy: {accuracy:.4f}", flush=True)
        print(f"training took {train_seconds:.2f} s", flush=True)
        metrics = {
            "test_accuracy": round(accuracy, 4),
            "epochs": args.epochs,
            "world_size": num_workers,
            "replicas": strategy.num_replicas_in_sync,
            "train_seconds": round(train_seconds, 2),
        }
        with open(os.path.join(model_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
    else:
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
