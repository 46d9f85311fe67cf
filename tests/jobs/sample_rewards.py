"""Rewards for the `k15 sample` and `k15 curate` tests, named in their prompt records as
``tests.jobs.sample_rewards:<function>`` (the reward registry imports them): a random-weight
model answers no arithmetic, so correctness here is a property of the text, or of the prompt,
that the tests can check."""

DIRECT_ANSWER = "Give only the final answer"  # the start of curate.hack_instruction's default


def even_length_reward(responses, samples, ctx=None):
    """1 for a response with an even number of characters, else 0."""
    return [float(len(r) % 2 == 0) for r in responses]


def never_reward(responses, samples, ctx=None):
    """0 for every response."""
    return [0.0 for _ in responses]


def direct_answer_reward(responses, samples, ctx=None):
    """1 when the prompt asks for the answer alone (k15 curate's direct-answer tries), else 0:
    an "easy to hack" prompt."""
    return [float(DIRECT_ANSWER in str(s.get("prompt"))) for s in samples]


def chain_of_thought_reward(responses, samples, ctx=None):
    """1 unless the prompt asks for the answer alone: a prompt every normal sample solves."""
    return [float(DIRECT_ANSWER not in str(s.get("prompt"))) for s in samples]


def even_length_with_reasoning_reward(responses, samples, ctx=None):
    """:func:`even_length_reward`, but 0 whenever the prompt asks for the answer alone."""
    return [float(len(r) % 2 == 0 and DIRECT_ANSWER not in str(s.get("prompt"))) for r, s in zip(responses, samples)]
