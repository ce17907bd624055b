"""The transfer benchmark's data handling: label direction, subsets, and the shared source weights."""

import numpy as np
import pandas as pd
import pytest

from benchmarks.transfer import ALL, BUSI, load_busi, mean_interval, paired_table, subsample
from configs import TaskKind
from tasks.preprocess import SplitData


@pytest.mark.skipif(not BUSI.exists(), reason=f"BUSI 256 px images not found at {BUSI}")
def test_busi_keeps_official_split_sizes_and_makes_malignant_the_positive_class():
    data = np.load(BUSI)
    busi = load_busi(32)
    assert (len(busi.train), len(busi.val), len(busi.test)) == (546, 78, 156)
    assert busi.train.images.shape[1:] == (32, 32) and busi.train.images.dtype == np.uint8
    # BreastMNIST: 0 = malignant; BUSI's own class column: 2 = malignant
    assert np.array_equal(busi.test.targets == 1, data["test_busi_class"] == 2)
    assert busi.label_names[1] == "malignant"


def test_subsample_is_stratified_seeded_and_all_means_all():
    split = SplitData(np.arange(100 * 4, dtype=np.uint8).reshape(100, 2, 2), np.array([0.0] * 70 + [1.0] * 30))
    first = subsample(split, 20, TaskKind.CLASSIFICATION, seed=1)
    assert len(first) == 20 and first.targets.sum() == 6  # 30% positives kept
    assert np.array_equal(first.images, subsample(split, 20, TaskKind.CLASSIFICATION, seed=1).images)
    assert not np.array_equal(first.images, subsample(split, 20, TaskKind.CLASSIFICATION, seed=2).images)
    assert subsample(split, ALL, TaskKind.REGRESSION, seed=0) is split


def test_paired_table_compares_pretrained_with_random_init_seed_by_seed():
    rows = [{"dataset": "busi", "size": "50", "n_train": 50, "seed": seed, "weights": weights, "strategy": "full",
             "strategy_used": "full", "roc_auc": auc, "accuracy": 0.7}
            for seed, (scratch, pretrained) in enumerate([(0.60, 0.70), (0.70, 0.72), (0.65, 0.64)])
            for weights, auc in (("random init", scratch), ("PneumoniaMNIST-pretrained", pretrained))]
    table = paired_table(pd.DataFrame(rows))
    line = next(row for row in table.splitlines() if "| roc_auc |" in row)
    mean, low, high = mean_interval(pd.Series([0.10, 0.02, -0.01]))
    assert f"| {mean:+.3f} [{low:+.3f}, {high:+.3f}] | 2 of 3 |" in line and low < 0 < high
