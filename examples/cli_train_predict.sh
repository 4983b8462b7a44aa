#!/usr/bin/env bash
# The command line end to end: train on a folder of photos, score new ones, inspect.
#   bash examples/cli_train_predict.sh [PHOTOS_DIR]
# PHOTOS_DIR: DIR/train/<class>/<image> and DIR/test/<class>/<image> (default: ../shared/data/hymenoptera).
set -euo pipefail
data="${1:-$(dirname "$0")/../../shared/data/hymenoptera}"
out="$(mktemp -d)"
skltransfer train "$data/train" --out "$out/model.skops" --quiet
printf 'not an image\n' > "$out/broken.jpg"      # one bad file: it becomes an error row
set +e
skltransfer predict "$out/model.skops" "$data/test" "$out/broken.jpg" --top-k 2 --out "$out/predictions.csv" --quiet
code=$?
set -e
echo "predict exit code: $code (3 = finished, some images unreadable)"
head -3 "$out/predictions.csv"
grep -c ",$" "$out/predictions.csv" | xargs echo "rows without error:"
skltransfer extract "$data/test" --out "$out/features.npy" --quiet
python -c "import numpy as np; print('features', np.load('$out/features.npy').shape)"
skltransfer cache info
