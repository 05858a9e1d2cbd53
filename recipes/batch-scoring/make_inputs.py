"""Write the files to score: scikit-learn's digits (bundled, no download) split into
FILES CSV files of ROWS images each. A row is the 64 pixel values (0-16) of one 8x8
image, then its true label, so the scores can be checked.

    python make_inputs.py OUT_DIR [--files 200] [--rows 9]
"""

import argparse
import os

from sklearn.datasets import load_digits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--rows", type=int, default=9, help="images per file (digits has 1,797)")
    args = p.parse_args(argv)
    x, y = load_digits(return_X_y=True)
    os.makedirs(args.out_dir, exist_ok=True)
    for i in range(args.files):
        with open(os.path.join(args.out_dir, f"digits-{i:04d}.csv"), "w") as f:
            for r in range(args.rows):
                k = (i * args.rows + r) % len(x)
                f.write(",".join(str(int(v)) for v in x[k]) + f",{y[k]}\n")
    print(f"wrote {args.files} files of {args.rows} images to {args.out_dir}")


if __name__ == "__main__":
    main()
