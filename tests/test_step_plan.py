"""data/batching.py's step_plan alone: the order of every optimizer step, a pure function of its arguments."""
from itertools import islice

from tunesmith.data.batching import epoch_plan, step_plan

LENGTHS = [5, 40, 7, 12, 33, 2, 18, 25, 9, 14, 30, 3, 21]  # 13 examples: the last step of an epoch is short


def take(n, **kw):
    return list(islice(step_plan(LENGTHS, 4, seed=7, **kw), n))


def test_each_epoch_trains_every_example_once_in_its_epoch_plan_order():
    steps = take(8)  # 13 examples in steps of 4: 4 steps an epoch
    assert [epoch for epoch, _ in steps] == [0] * 4 + [1] * 4
    for epoch in (0, 1):
        examples = [ex for e, ex in steps if e == epoch]
        assert examples == epoch_plan(LENGTHS, 4, 7, epoch)
        assert sorted(i for ex in examples for i in ex) == list(range(len(LENGTHS)))
    many = [(i * 37) % 101 for i in range(300)]  # more than one window of 32 steps: each epoch is drawn anew
    first, second = (list(islice(step_plan(many, 4, seed=7, start=s), 75)) for s in (0, 75))
    assert {e for e, _ in first} == {0} and {e for e, _ in second} == {1}
    assert [ex for _, ex in first] != [ex for _, ex in second]


def test_repeats_train_each_batch_that_many_steps_in_a_row():
    once, twice = take(8), take(16, repeats=2)
    assert twice[0::2] == once and twice[1::2] == once


def test_starting_at_a_step_is_the_same_plan_from_that_step():
    whole = take(11, repeats=2)
    for start in (0, 1, 3, 8, 10):
        assert take(11 - start, repeats=2, start=start) == whole[start:]


def test_the_plan_depends_on_the_seed_and_only_on_its_arguments():
    assert take(6) == take(6)
    assert take(6) != list(islice(step_plan(LENGTHS, 4, seed=8), 6))
    by_length = [sorted(ex, key=lambda i: LENGTHS[i]) for _, ex in take(4)]
    assert [ex for _, ex in take(4)] == by_length  # a step's examples come sorted by length (little padding)
