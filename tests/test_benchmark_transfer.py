"""The transfer benchmark's data handling: label direction, subsets, and the shared source weights."""

import numpy as np
import pytest

from benchmarks.transfer import ALL, BUSI, load_busi, subsample
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
