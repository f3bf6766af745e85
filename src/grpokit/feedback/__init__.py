"""Human feedback: people rank each group in a browser while the model trains (docs/human-feedback.md).

* `FeedbackStore` (store): groups waiting and every ranking, in SQLite (WAL) in the run folder;
  export to TRL's preference format;
* `FeedbackServer` (server): the ranking page and its JSON API (Starlette, served by uvicorn in a
  thread of the trainer), behind a token, on 127.0.0.1 by default;
* `HumanFeedbackReward` (reward, registry name `human`): a group reward that waits for the
  rankings up to a deadline and lets a fallback (a judge, a reward, or advantage 0) score the rest.

Names are imported lazily: `grpokit.feedback.store` needs only the standard library.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"FeedbackStore": "store", "Group": "store", "Ranking": "store", "group_id": "store",
            "FeedbackServer": "server", "HumanFeedbackReward": "reward"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grpokit.feedback' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"grpokit.feedback.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
