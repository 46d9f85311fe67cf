"""Long2short selection (PAPER.md section 7) against hand-made groups: ties, no correct answer,
the 1.5x rule at its boundary."""

import pytest
import torch

from k15_megatron.rl.long2short import dpo_pairs, shortest_correct

# three groups of four: (lengths, correct)
LENGTHS = torch.tensor([30, 12, 12, 40,   # group 0: tie of two correct 12s -> the earlier one (1)
                        10, 20, 30, 5,    # group 1: none correct
                        8, 12, 13, 4])    # group 2: shortest correct 8 (4 is wrong)
CORRECT = torch.tensor([1, 1, 1, 0,
                        0, 0, 0, 0,
                        1, 1, 1, 0], dtype=torch.bool)


def test_shortest_correct_picks_the_earliest_of_ties_and_marks_groups_without_one():
    assert shortest_correct(LENGTHS, CORRECT, 4).tolist() == [1, -1, 8]
    assert shortest_correct(LENGTHS.float(), CORRECT.int(), 12).tolist() == [8]  # one group of 12
    assert shortest_correct(torch.tensor([5]), torch.tensor([True]), 1).tolist() == [0]


def test_dpo_pairs_take_wrong_and_too_long_correct_responses():
    # group 0: chosen 1 (12 tokens); 30 > 18 correct -> negative; 12 (index 2) is not; 40 wrong -> negative
    # group 2: chosen 8 (8 tokens); 12 = 1.5 x 8 is not longer -> kept out; 13 > 12 -> negative; 4 wrong
    assert dpo_pairs(LENGTHS, CORRECT, 4) == [(1, 0), (1, 3), (8, 10), (8, 11)]
    assert dpo_pairs(LENGTHS, CORRECT, 4, ratio=1.0) == [(1, 0), (1, 3), (8, 9), (8, 10), (8, 11)]
    assert dpo_pairs(LENGTHS, CORRECT, 4, ratio=10.0) == [(1, 3), (8, 11)]


def test_bad_shapes_and_ratios_are_refused():
    with pytest.raises(ValueError, match="group_size=5"):
        shortest_correct(LENGTHS, CORRECT, 5)
    with pytest.raises(ValueError, match="same length"):
        shortest_correct(LENGTHS, CORRECT[:4], 4)
    with pytest.raises(ValueError, match="ratio"):
        dpo_pairs(LENGTHS, CORRECT, 4, ratio=0.5)
