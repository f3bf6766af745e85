"""Reward functions for sums.jsonl, with TRL's signature: the dataset's other columns (here
`answer`) arrive as keyword arguments, one value per completion."""


def exact(prompts, completions, answer, **kwargs):
    """1.0 when the completion is the right number (spaces ignored), else 0.0."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def digits_only(prompts, completions, **kwargs):
    """0.2 for an answer made of digits only: a small shaping reward for the format."""
    return [0.2 if c.strip().isdigit() else 0.0 for c in completions]
