"""Rewards for the `k15 sample` test, named in its prompt records as
``tests.jobs.sample_rewards:<function>`` (the reward registry imports them): a random-weight
model answers no arithmetic, so correctness here is a property of the text the test can check."""


def even_length_reward(responses, samples, ctx=None):
    """1 for a response with an even number of characters, else 0."""
    return [float(len(r) % 2 == 0) for r in responses]


def never_reward(responses, samples, ctx=None):
    """0 for every response."""
    return [0.0 for _ in responses]
