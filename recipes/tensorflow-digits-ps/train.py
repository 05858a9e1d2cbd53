"""TF2 ParameterServerStrategy (CPU) on scikit-learn's digits data set.

One script for every task of the cluster, which it reads from TF_CONFIG
({"cluster": {"chief": [...], "ps": [...], "worker": [...]}, "task": {"type": ..., "index": i}}):

- "ps" and "worker" tasks start a `tf.distribute.Server` and serve until they are
  stopped: in TF2 they never exit on their own (under raybatch the job ends when the
  chief does, and the other ranks are stopped then);
- the "chief" is the coordinator: it creates the variables (they live on the parameter
  servers), schedules training steps on the workers with a
  `tf.distribute.coordinator.ClusterCoordinator`, evaluates, prints
  `test accuracy: X` and writes model.keras and metrics.json to --model-dir.

Without TF_CONFIG it runs as one process with no cluster (tf.distribute's default
strategy), which is handy to check the model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10,
                   help="passes over the training data, counted in scheduled steps (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of one step on a worker (default 32)")
    p.add_argument(
        "--model-dir",
        default=os.environ.get("RAYBATCH_OUTPUT_MODEL") or "./outputs",
        help="where model.keras and metrics.json go (default: $RAYBATCH_OUTPUT_MODEL, else ./outputs)",
    )
    return p.parse_args(argv)


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


def serve(task_type: str, task_index: int) -> None:
    """A parameter server or a worker: serve the chief until stopped."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=task_type, task_index=task_index,
                                  protocol=resolver.rpc_layer or "grpc", start=True)
    print(f"{task_type} {task_index}: serving at {server.target}", flush=True)
    server.join()


def train(args, num_workers: int, num_ps: int) -> None:
    import keras
    import tensorflow as tf

    x_train, y_train, x_test, y_test = load_data()
    keras.utils.set_random_seed(SEED)

    if num_workers:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = tf.distribute.ParameterServerStrategy(resolver)
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    else:  # no cluster: the default strategy, steps run here
        strategy, coordinator = tf.distribute.get_strategy(), None

    def dataset_fn(input_context=None):
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        if input_context is not None:  # each worker reads its own share
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds.shuffle(len(x_train), seed=SEED).batch(args.batch_size, drop_remainder=True).repeat()

    with strategy.scope():  # the variables are created on the parameter servers
        model = keras.Sequential([
            keras.Input(shape=(64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ])
        optimizer = keras.optimizers.Adam(args.lr)
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        x, y = next(iterator)
        return strategy.run(step, args=(x, y))

    # Asynchronous training: each scheduled step runs on whichever worker is free,
    # reads the variables from the parameter servers and writes its update back.
    steps_per_epoch = len(x_train) // args.batch_size
    t0 = time.monotonic()
    if coordinator is not None:
        per_worker = coordinator.create_per_worker_dataset(
            lambda: strategy.distribute_datasets_from_function(dataset_fn))
        iterator = iter(per_worker)
        for epoch in range(1, args.epochs + 1):
            losses = [coordinator.schedule(train_step, args=(iterator,)) for _ in range(steps_per_epoch)]
            coordinator.join()  # the epoch's steps are done
            mean = sum(float(r.fetch()) for r in losses) / len(losses)
            print(f"epoch {epoch}/{args.epochs} loss {mean:.4f}", flush=True)
    else:
        iterator = iter(dataset_fn())
        for epoch in range(1, args.epochs + 1):
            mean = sum(float(train_step(iterator)) for _ in range(steps_per_epoch)) / steps_per_epoch
            print(f"epoch {epoch}/{args.epochs} loss {mean:.4f}", flush=True)
    train_seconds = time.monotonic() - t0

    # the chief reads the trained variables from the parameter servers
    logits = model(x_test, training=False)
    accuracy = float((tf.argmax(logits, axis=1).numpy() == y_test).mean())
    print(f"test accuracy: {accuracy:.4f}", flush=True)
    print(f"training took {train_seconds:.2f} s", flush=True)
    os.makedirs(args.model_dir, exist_ok=True)
    model.save(os.path.join(args.model_dir, "model.keras"))
    metrics = {
        "test_accuracy": round(accuracy, 4),
        "epochs": args.epochs,
        "workers": num_workers,
        "parameter_servers": num_ps,
        "train_seconds": round(train_seconds, 2),
    }
    with open(os.path.join(args.model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")


def main(argv=None):
    args = parse_args(argv)
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    task_type, task_index = task.get("type", "chief"), int(task.get("index", 0))
    num_workers, num_ps = len(cluster.get("worker", [])), len(cluster.get("ps", []))
    print(f"{task_type} {task_index} ({num_ps} ps, {num_workers} worker(s)) on host {socket.gethostname()} "
          f"pid {os.getpid()}", flush=True)
    if task_type in ("ps", "worker"):
        serve(task_type, task_index)
    else:
        train(args, num_workers, num_ps)


if __name__ == "__main__":
    main()
