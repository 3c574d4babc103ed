"""A UserError raised inside a DataLoader worker still reads as its one line."""

import pytest
import torch
from torch.utils.data import DataLoader

from stoptool.errors import UserError, plural


class _Refuses(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise UserError("cannot place a context block: lower the target scale")


def test_user_error_from_a_worker_is_one_line():
    with pytest.raises(UserError) as err:
        next(iter(DataLoader(_Refuses(), batch_size=2, num_workers=1)))
    assert "Original Traceback" in err.value.args[0]  # torch wrapped it with the worker's traceback
    assert str(err.value) == "cannot place a context block: lower the target scale"


def test_plain_user_error_is_its_message():
    assert str(UserError("--lr must be >= 0")) == "--lr must be >= 0"


def test_plural_counts_read_as_english():
    assert [plural(n, "patch") for n in (0, 1, 2)] == ["0 patches", "1 patch", "2 patches"]
    assert (plural(1, "image"), plural(5, "image"), plural(3, "context patch")) == (
        "1 image", "5 images", "3 context patches")
