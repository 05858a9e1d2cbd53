"""Score files with the digits model of recipes/pytorch-digits-ddp: one predictions file
per input file. Runs as a raybatch array task (every item of the task: the files listed
in $RAYBATCH_ITEMS_FILE) or by hand:

    python score.py --model MODEL_DIR --out OUT_DIR FILE.csv [FILE.csv ...]

MODEL_DIR holds model.pt and preprocess.json (default $RAYBATCH_INPUT_MODEL). For each
FILE.csv it writes OUT_DIR/<FILE stem>.predictions.csv ("predicted,label" per image);
in an array task OUT_DIR is each item's own $RAYBATCH_ITEM_OUTPUT_DIR (the first item's
for a batch: every file of the task goes there), plus a summary line on stdout."""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):  # the architecture of recipes/pytorch-digits-ddp/train.py
    def __init__(self, n_in=64, hidden=128, n_out=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_out))

    def forward(self, x):
        return self.net(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="default: the lines of $RAYBATCH_ITEMS_FILE")
    p.add_argument("--model", default=os.environ.get("RAYBATCH_INPUT_MODEL"))
    p.add_argument("--out", default=os.environ.get("RAYBATCH_ITEM_OUTPUT_DIR"))
    args = p.parse_args(argv)
    files = args.files
    if not files and os.environ.get("RAYBATCH_ITEMS_FILE"):
        with open(os.environ["RAYBATCH_ITEMS_FILE"]) as f:
            files = [line.strip() for line in f if line.strip()]
    if not files or not args.model or not args.out:
        p.error("give files (or run as an array task), --model and --out")
    torch.set_num_threads(1)
    model = MLP()
    model.load_state_dict(torch.load(os.path.join(args.model, "model.pt"), map_location="cpu"))
    model.eval()
    with open(os.path.join(args.model, "preprocess.json")) as f:
        pre = json.load(f)
    mean, scale = np.array(pre["mean"], dtype=np.float32), np.array(pre["scale"], dtype=np.float32)
    os.makedirs(args.out, exist_ok=True)
    right = total = 0
    for path in files:
        data = np.loadtxt(path, delimiter=",", ndmin=2)
        x, labels = data[:, :64].astype(np.float32), data[:, 64].astype(int)
        with torch.no_grad():
            predicted = model(torch.from_numpy((x - mean) / scale)).argmax(dim=1).numpy()
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(os.path.join(args.out, f"{stem}.predictions.csv"), "w") as f:
            f.write("predicted,label\n")
            f.writelines(f"{a},{b}\n" for a, b in zip(predicted, labels))
        right += int((predicted == labels).sum())
        total += len(labels)
    print(f"scored {len(files)} file(s), {total} image(s): accuracy {right / total:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
