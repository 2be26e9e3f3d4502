import numpy as np
import torch

from kava_common.cache import CacheSample as Sample
from stage1_extract.capture import sample_spans
from stage1_extract.samples import collate, length_sorted_batches, plan_shards
from stage1_extract.writer import nonfinite_samples, suspect_layers


def test_collate_right_and_left_padding():
    ids, mask, pos = collate([[5, 6, 7], [8]], pad_id=0, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask, pos = collate([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]          # the real token sits at position 0
    assert sample_spans([3, 1], 3, "left") == [0, 2]
    assert sample_spans([3, 1], 3, "right") == [0, 0]


def _sample(n):
    return Sample(0, "", np.zeros(n, np.int64), np.zeros((n, 2), np.int32), [], (), False)


def test_plan_shards_and_batches():
    samples = [_sample(n) for n in (4, 1, 3, 5, 2)]
    # 10 bytes per token, shards close once they reach 40 bytes
    assert plan_shards(samples, 10, 40) == [[0], [1, 2], [3], [4]]
    assert plan_shards(samples, 10, 1e9) == [[0, 1, 2, 3, 4]]
    # positions inside the shard, longest first
    assert length_sorted_batches(samples, [0, 1, 2, 3, 4], 2) == [[3, 0], [2, 4], [1]]


def test_nonfinite_samples_flags_by_hand():
    k = torch.zeros(6, 2, 3, dtype=torch.float16)            # 3 samples of 2, 1, 3 tokens
    v = torch.zeros(6, 2, 3, dtype=torch.float16)
    off = torch.tensor([0, 2, 3, 6])
    assert nonfinite_samples({0: (k, v)}, off).tolist() == [False, False, False]
    v[2, 1, 0] = float("inf")                                 # token 2 -> sample 1
    k[5, 0, 2] = float("nan")                                 # token 5 -> sample 2
    assert nonfinite_samples({0: (k.clone().zero_(), k.clone().zero_()), 3: (k, v)}, off).tolist() == \
        [False, True, True]
    big = torch.full((6, 2, 3), 60000.0, dtype=torch.float16)  # large but finite: no false alarm
    assert nonfinite_samples({0: (big, big)}, off).tolist() == [False, False, False]
    assert suspect_layers({0: (k.clone().zero_(), k.clone().zero_()), 3: (k, v), 5: (big, big)}) == [3]
    for dt in (torch.bfloat16, torch.float32):                # the screen in every stored dtype
        x = torch.zeros(6, 2, 3, dtype=dt)
        assert suspect_layers({1: (x, x)}) == []
        y = x.clone()
        y[4, 1, 1] = float("-inf")
        assert suspect_layers({1: (x, y)}) == [1]
    empty = torch.zeros(0, 2, 3)
    assert suspect_layers({0: (empty, empty)}) == []
