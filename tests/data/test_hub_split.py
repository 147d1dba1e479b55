"""load_hub_split: the one loader of a Hub dataset split that text, image and pair data share."""

import datasets
import huggingface_hub
import pytest

from lmssl.config import DataConfig
from lmssl.data.files import load_hub_split
from lmssl.errors import UserError


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("split, validation_split, expected", [("train", "", "train"), ("validation", "", "train"),
                                                               ("validation", "test", "test")])
def test_an_unreachable_dataset_is_one_line_naming_it_its_split_and_the_local_fix(offline, split, validation_split,
                                                                                  expected):
    d = DataConfig(dataset="lmssl-test/no-such-dataset", validation_split=validation_split)
    with pytest.raises(UserError) as e:
        load_hub_split(d, split, local_hint="local images")
    msg = str(e.value)
    assert "\n" not in msg and "'lmssl-test/no-such-dataset'" in msg and f"split '{expected}'" in msg
    assert msg.endswith("point data.train_files at local images")
