"""Reward registry: choose reward functions by name, by "package.module:function" path, or pass callables.

A registered entry is either a *reward function* (`fn(prompts, completions, completion_ids=None,
**columns) -> list[float | None]`), whose config keyword arguments are bound with
`functools.partial`, or a *reward factory* (a class, or a function marked with `reward_factory`),
which is called once with the keyword arguments and returns the reward callable. Classes suit
rewards with state or options (a compiled regex, a loaded reward model, a sandbox).

Built-ins are registered as lazy "module:attr" strings so that importing the registry imports
neither math-verify nor transformers.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["REWARD_REGISTRY", "register_reward", "reward_factory", "resolve_reward", "load_reward_funcs",
           "reward_name"]

F = TypeVar("F", bound=Callable[..., Any])

# name -> callable, class, or lazy "module:attr" string (built-ins)
REWARD_REGISTRY: dict[str, Any] = {
    "accuracy": "grpokit.rewards.math:AccuracyReward",
    "math_accuracy": "grpokit.rewards.math:AccuracyReward",
    "format": "grpokit.rewards.format:ThinkAnswerFormat",
    "think_answer_format": "grpokit.rewards.format:ThinkAnswerFormat",
    "soft_format": "grpokit.rewards.format:SoftThinkAnswerFormat",
    "regex": "grpokit.rewards.format:RegexReward",
    "soft_overlong_punishment": "grpokit.rewards.length:SoftOverlongPunishment",
    "cosine_length": "grpokit.rewards.length:CosineLengthReward",
    "reward_model": "grpokit.rewards.model:RewardModelReward",
    "preference": "grpokit.rewards.model:PreferenceReward",
    "judge": "grpokit.rewards.judges.listwise:JudgeReward",
    "pairwise_judge": "grpokit.rewards.judges.pairwise:PairwiseJudgeReward",
    "human": "grpokit.feedback.reward:HumanFeedbackReward",
    "code": "grpokit.rewards.code:CodeReward",
    "chrf": "grpokit.rewards.similarity:ChrfReward",
    "bleu": "grpokit.rewards.similarity:BleuReward",
    "rouge": "grpokit.rewards.similarity:RougeReward",
    "consensus": "grpokit.rewards.similarity:ConsensusReward",
    # TRL's built-in rewards (trl.rewards), by TRL's names, for `trl grpo --reward_funcs ...` scripts
    "accuracy_reward": "grpokit.rewards.math:AccuracyReward",
    "reasoning_accuracy_reward": "grpokit.rewards.math:ReasoningAccuracyReward",
    "think_format_reward": "grpokit.rewards.format:think_format_reward",
    "get_soft_overlong_punishment": "grpokit.rewards.length:trl_soft_overlong_punishment",
}


def group_reward(fn: F) -> F:
    """Declare that a reward function scores a whole group: it is called once per prompt with that
    prompt's G completions together (TRL's signature, every argument a list of G entries: the
    prompt and the row's columns repeated, `num_generations=G`) and returns G values. A group
    never splits across calls, workers or ranks; TRL-style functions run beside it unchanged."""
    fn.scores_groups = True  # type: ignore[attr-defined]  # a marker attribute on a function object
    return fn


def scores_groups(fn: Any) -> bool:
    """Whether `fn` was declared a group reward (`group_reward`, or `scores_groups = True` on a
    callable class), through the partials the registry wraps names in."""
    while isinstance(fn, functools.partial):
        if getattr(fn, "scores_groups", False):
            return True
        fn = fn.func
    return bool(getattr(fn, "scores_groups", False))


def reward_factory(fn: F) -> F:
    """Mark a function as a factory: the registry calls it with the config kwargs to get the reward."""
    fn.__reward_factory__ = True  # type: ignore[attr-defined]  # a marker attribute on a function object
    return fn


def register_reward(name: str | Callable | None = None, fn: Callable | None = None, *, overwrite: bool = False):
    """Register a reward function or factory under `name` (default: its `__name__`).

    Usable as `@register_reward`, `@register_reward("name")` or `register_reward("name", fn)`.
    Registering a taken name raises unless `overwrite=True`.
    """
    if callable(name) and fn is None:  # bare @register_reward
        return register_reward(None, name, overwrite=overwrite)

    def add(f: Callable) -> Callable:
        key = name or getattr(f, "__name__", None)
        if not key or not isinstance(key, str):
            raise ValueError(f"register_reward: give a name for {f!r} (it has no __name__).")
        if ":" in key:
            raise ValueError(f"register_reward: {key!r}: names cannot contain ':' (reserved for module paths).")
        if key in REWARD_REGISTRY and REWARD_REGISTRY[key] is not f and not overwrite:
            raise ValueError(f"register_reward: {key!r} is already registered; pass overwrite=True to replace it.")
        REWARD_REGISTRY[key] = f
        return f

    return add if fn is None else add(fn)


def import_path(path: str, kind: str = "reward") -> Any:
    """'pkg.mod:attr.sub' (or TRL's dotted 'pkg.mod.attr') -> the object; errors name `kind`."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        known = f"not a registered name ({', '.join(sorted(REWARD_REGISTRY))}) nor" if kind == "reward" else "not"
        raise ValueError(f"{kind} {path!r}: {known} a 'package.module:function' path.")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{kind} {path!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}.") from None
    return obj


def _is_factory(obj: Any) -> bool:
    return inspect.isclass(obj) or getattr(obj, "__reward_factory__", False)


def reward_name(fn: Any) -> str:
    """The name a reward is logged under: its `__name__`, else its class name."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return type(fn).__name__


def is_reward_model_spec(spec: Any) -> bool:
    """TRL's way of naming a reward model in `reward_funcs`: a loaded sequence classifier, or a
    string that is no registered name and no 'module:function' path but a local model folder or
    a hub id ('org/name')."""
    if isinstance(spec, str):
        if spec in REWARD_REGISTRY or ":" in spec:
            return False
        from pathlib import Path

        if Path(spec).expanduser().is_dir():
            return (Path(spec).expanduser() / "config.json").is_file()
        return spec.count("/") == 1 and not spec.startswith((".", "/"))
    config = getattr(spec, "config", None)
    return config is not None and hasattr(spec, "forward") and getattr(config, "num_labels", None) is not None \
        and not hasattr(spec, "generate_reward")


def reward_model_name(spec: Any) -> str:
    """TRL's name for a reward model: the last part of its name or path."""
    name = spec if isinstance(spec, str) else getattr(getattr(spec, "config", None), "_name_or_path", "") or ""
    return str(name).rstrip("/").split("/")[-1] or type(spec).__name__


def resolve_reward(spec: str | Callable, kwargs: Mapping[str, Any] | None = None) -> Callable:
    """One spec (registry name, module path, reward model, or callable) + its kwargs -> a reward
    callable with `__name__`."""
    kwargs = dict(kwargs or {})
    if is_reward_model_spec(spec):  # a sequence classifier scores prompt + completion (TRL's meaning)
        from grpokit.rewards.model import RewardModelReward

        reward = RewardModelReward(spec, **kwargs)
        reward.__name__ = reward_model_name(spec)
        return reward
    if isinstance(spec, str):
        entry = REWARD_REGISTRY.get(spec)
        if entry is None:
            entry = import_path(spec)
            name = None
        else:
            name = spec
        if isinstance(entry, str):  # lazy built-in
            entry = import_path(entry)
    elif callable(spec):
        entry, name = spec, None
    else:
        raise TypeError(f"reward function spec must be a name, a 'module:function' path or a callable, "
                        f"got {type(spec).__name__}")

    owned = True  # `fn` is an object this call created, so it may be renamed in place
    fn: Callable[..., Any]
    if _is_factory(entry):
        try:
            fn = entry(**kwargs)
        except TypeError as e:
            raise ValueError(f"reward {name or reward_name(entry)!r}: bad keyword arguments {kwargs}: {e}") from e
    elif kwargs:
        try:
            inspect.signature(entry).bind_partial(**kwargs)
        except TypeError as e:
            raise ValueError(f"reward {name or reward_name(entry)!r}: bad keyword arguments {kwargs}: {e}") from e
        except ValueError:  # builtins without a signature: let the call fail later
            pass
        fn = functools.partial(entry, **kwargs)
        fn.__name__ = reward_name(entry)  # type: ignore[attr-defined]  # a partial takes attributes
    else:
        fn, owned = entry, False
    if not callable(fn):
        raise TypeError(f"reward {spec!r} resolved to {fn!r}, which is not callable.")
    if name is not None and reward_name(fn) != name:
        fn = _renamed(fn, name, owned)
        owned = True
    if isinstance(spec, str):
        if not owned:
            fn = _renamed(fn, reward_name(fn), False)
        try:  # lets a worker process rebuild the function when it cannot be pickled
            fn.__grpokit_spec__ = (spec, kwargs)  # type: ignore[attr-defined]  # set where the object takes it
        except (AttributeError, TypeError):
            pass
    return fn


def _renamed(fn: Callable, name: str, owned: bool) -> Callable:
    """Give `fn` the registry name it was chosen by; never renames a caller's function in place."""
    if owned:
        try:
            fn.__name__ = name
            return fn
        except (AttributeError, TypeError):
            pass
    wrapped = functools.partial(fn)
    wrapped.__name__ = name  # type: ignore[attr-defined]  # a partial takes attributes
    return wrapped


def load_reward_funcs(specs: Iterable[str | Callable] | str | Callable,
                      reward_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Callable]:
    """Resolve reward specs into callables, each with a `__name__`.

    `reward_kwargs` maps a spec (the string as given, or the function's name) to its keyword
    arguments; a key that matches no function is an error (a typo would otherwise be silent).
    """
    if isinstance(specs, (str, bytes)) or callable(specs):
        specs = [specs]
    specs = list(specs)
    reward_kwargs = dict(reward_kwargs or {})
    used: set[str] = set()
    funcs = []
    for spec in specs:
        keys = [spec] if isinstance(spec, str) else []
        keys.append(reward_name(spec) if not isinstance(spec, str) else spec.rpartition(":")[2].rpartition(".")[2])
        key = next((k for k in keys if k in reward_kwargs), None)
        kwargs = reward_kwargs.get(key, {}) if key is not None else {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"reward_kwargs[{key!r}] must be a mapping of keyword arguments, got {kwargs!r}")
        if key is not None:
            used.add(key)
        funcs.append(resolve_reward(spec, kwargs))
    unused = set(reward_kwargs) - used
    if unused:
        raise ValueError(f"reward_kwargs has entries for {sorted(unused)}, which match no reward function "
                         f"(functions: {[reward_name(f) for f in funcs]}).")
    return funcs
