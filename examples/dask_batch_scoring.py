"""
Batch scoring with Dask: a LocalCluster here, any cluster in production
=======================================================================


Usage::

    python examples/dask_batch_scoring.py [PHOTOS_DIR]

Trains a small model on PHOTOS_DIR/train (default: the ants and bees photos,
``skltransfer.datasets.fetch_hymenoptera``, downloaded once; offline, scikit-learn's
handwritten digits, which install with it), then scores the test
photos as a Dask DataFrame of paths on 2 local workers, writes the predictions to a
Parquet dataset and prints the accuracy. Needs pip install skltransfer[dask].
"""

import argparse
import tempfile
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
from distributed import Client, LocalCluster
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import skltransfer.dask
from skltransfer import PretrainedFeatures, load_image_folder, stable_train_test_split
from skltransfer.datasets import DatasetUnavailableError, fetch_hymenoptera, write_digits_folder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Batch scoring with Dask on a 2-worker LocalCluster.")
    parser.add_argument("photos", nargs="?", type=Path,
                        help="a folder with train/ and test/ class folders (default: the ants and bees photos)")
    try:
        root = parser.parse_args().photos or fetch_hymenoptera()
    except DatasetUnavailableError as exc:  # offline: digits that come with scikit-learn instead
        print(f"{exc}\nUsing scikit-learn's handwritten digits instead (installed, no download).")
        root = write_digits_folder(Path(tempfile.mkdtemp(prefix="skltransfer-dask-")) / "digits")
    if (root / "train").is_dir():
        train, y_train = load_image_folder(root / "train")
        test, y_test = load_image_folder(root / "test")
    else:
        train, test, y_train, y_test = stable_train_test_split(*load_image_folder(root), test_size=0.25)
    model = make_pipeline(PretrainedFeatures(), LogisticRegression(max_iter=1000)).fit(train, y_train)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
        paths = dd.from_pandas(pd.DataFrame({"path": test}), npartitions=8)
        predictions = skltransfer.dask.predict(model, paths, top_k=2)
        out = Path(tempfile.mkdtemp()) / "predictions"
        predictions.to_parquet(str(out), write_index=False)

    result = pd.read_parquet(out)
    accuracy = (result["prediction"].to_numpy() == y_test).mean()
    print(result.head(3).to_string(index=False))
    print(f"{len(result)} predictions in {out}; accuracy {accuracy:.1%}")
