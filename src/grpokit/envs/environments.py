"""TRL's `environment_factory`: one environment per rollout, its public methods as its tools.

A factory is a callable (one environment for every row) or a dict name -> callable (each row
picks one by its `environment` column). An environment has `reset(**row)` (returning None or a
string appended to the last user message of the prompt), tool methods (public, with type hints
and a Google-style docstring, as `tools=`), and optionally `get_reward()` -> float: then it is a
reward function too (weight 1, named after its class, None for rollouts of other classes).
Instances are pooled: built when a batch needs more than exist, reset for every rollout.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from grpokit.envs.tools import is_async_tool, tool_name

SPECIAL_METHODS = ("reset", "get_reward")


def environment_tools(instance) -> list[Callable]:
    """The tool methods of an environment: its public functions except reset and get_reward
    (listed on the class, so that properties are not evaluated)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in SPECIAL_METHODS and not name.startswith("_")]


def env_reward_func(env_type: type[Any]) -> Callable:
    """`get_reward` of the rollouts whose environment is exactly `env_type`, None for the others."""
    get_reward: Any  # a function that takes the attributes set below
    if is_async_tool(env_type.get_reward):
        async def get_reward_async(environments, **kwargs):
            return [await e.get_reward() if type(e) is env_type else None for e in environments]
        get_reward = get_reward_async
    else:
        def get_reward_sync(environments, **kwargs):
            return [e.get_reward() if type(e) is env_type else None for e in environments]
        get_reward = get_reward_sync
    get_reward.__name__ = env_type.__name__
    get_reward.__qualname__ = env_type.__name__
    get_reward.use_process_pool = False  # it reads this process's environment instances
    return get_reward


class Environments:
    """The factories, their tools and reward functions (probed once), and the pool of instances."""

    def __init__(self, factory, standalone_tools: list[Callable]):
        self.multi = isinstance(factory, dict)
        self.factories: dict[Any, Callable] = dict(factory) if self.multi else {None: factory}
        if self.multi and not self.factories:
            raise ValueError("environment_factory is an empty dict: give at least one name -> factory.")
        self.tools: dict[Any, list[Callable]] = {}
        self.pool: dict[Any, list] = {}
        self.reward_types: list[type] = []
        self.standalone = list(standalone_tools)
        for name, make in self.factories.items():
            if not callable(make):
                raise TypeError(f"environment_factory{'' if name is None else f'[{name!r}]'} must be callable "
                                f"(a class or a function returning an environment), got {type(make).__name__}.")
            instance = make()
            if not callable(getattr(instance, "reset", None)):
                raise ValueError("Each environment instance returned by `environment_factory` must define a callable "
                                 f"`reset` ({type(instance).__name__} has none).")
            self.tools[name] = list(standalone_tools) + environment_tools(instance)
            self.pool[name] = [instance]
            if callable(getattr(instance, "get_reward", None)) and type(instance) not in self.reward_types:
                self.reward_types.append(type(instance))

    def reward_funcs(self) -> list[Callable]:
        return [env_reward_func(t) for t in self.reward_types]

    def all_tools(self) -> list[Callable]:
        """The standalone tools, then every environment's methods (each tool once)."""
        out = list(self.standalone)
        for tools in self.tools.values():
            out += [t for t in tools if t not in out]
        return out

    def name_of(self, row: dict) -> Any:
        return row.get("environment") if self.multi else None

    def check_rows(self, names: list) -> None:
        """Every row's `environment` is one of the factories (before step 1)."""
        if not self.multi:
            return
        for i, name in enumerate(names):
            if name not in self.factories:
                raise ValueError(f"Example has `environment={name!r}` (row {i}), which is not among the environments "
                                 f"passed to `environment_factory`. Expected one of: {list(self.factories)}.")

    def take(self, names: list) -> list:
        """One instance per rollout (names: each rollout's environment), from the pool."""
        self.check_rows(names)
        cursor: dict[Any, int] = {}
        out = []
        for name in names:
            pool = self.pool[name]
            i = cursor.get(name, 0)
            if i == len(pool):
                pool.append(self.factories[name]())
            cursor[name] = i + 1
            out.append(pool[i])
        return out

    def tools_of(self, instance) -> list[Callable]:
        """The tools of one rollout: the standalone ones, then its own instance's methods."""
        return self.standalone + environment_tools(instance)


def tool_table(tools: list[Callable]) -> dict[str, Callable]:
    return {tool_name(t): t for t in tools}
