"""Registry: names, "module:function" paths, kwargs via partial (name kept), factories, errors."""

import functools
import pickle
import sys
import textwrap

import pytest

from grpokit.rewards import REWARD_REGISTRY, RewardRunner, load_reward_funcs, register_reward, reward_name
from grpokit.rewards.registry import reward_factory


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        def exact(prompts, completions, answer, scale=1.0, **kw):
            return [scale * float(c == a) for c, a in zip(completions, answer)]

        class Shout:
            def __init__(self, bonus=0.0):
                self.bonus = bonus
            def __call__(self, prompts, completions, **kw):
                return [float(c.isupper()) + self.bonus for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


@pytest.fixture
def clean_registry():
    before = dict(REWARD_REGISTRY)
    yield
    REWARD_REGISTRY.clear()
    REWARD_REGISTRY.update(before)


def test_builtin_names_resolve_lazily_to_named_callables():
    funcs = load_reward_funcs(["accuracy", "format", "soft_format", "think_answer_format"])
    assert [reward_name(f) for f in funcs] == ["accuracy", "format", "soft_format", "think_answer_format"]
    assert all(callable(f) for f in funcs)
    assert funcs[1]([None], ["<think>a</think><answer>b</answer>"]) == [1.0]


def test_module_path_with_kwargs_keeps_the_name_and_pickles(user_module):
    funcs = load_reward_funcs([f"{user_module}:exact", f"{user_module}.exact"],
                              reward_kwargs={f"{user_module}:exact": {"scale": 2.0}})
    f, g = funcs
    assert isinstance(f, functools.partial) and f.__name__ == "exact" and f.keywords == {"scale": 2.0}
    assert f(None, ["x", "y"], answer=["x", "z"]) == [2.0, 0.0]
    assert g(None, ["x"], answer=["x"]) == [1.0]  # TRL's dotted path, no kwargs
    assert pickle.loads(pickle.dumps(f))(None, ["x"], answer=["x"]) == [2.0]
    out = RewardRunner(funcs)(["p", "p"], ["x", "y"], columns={"answer": ["x", "x"]})
    assert out.names == ["exact", "exact_2"]


def test_kwargs_keyed_by_function_name_and_class_factory(user_module):
    (shout,) = load_reward_funcs([f"{user_module}:Shout"], reward_kwargs={"Shout": {"bonus": 0.5}})
    assert shout(None, ["AB", "ab"]) == [1.5, 0.5]
    assert reward_name(shout) == "Shout"


def test_register_decorator_and_factory(clean_registry):
    @register_reward("always_one")
    def one(prompts, completions, value=1.0, **kw):
        return [value] * len(completions)

    @register_reward("const")
    @reward_factory
    def make_const(value):
        def const(prompts, completions, **kw):
            return [value] * len(completions)
        return const

    a, b = load_reward_funcs(["always_one", "const"], reward_kwargs={"always_one": {"value": 3.0},
                                                                     "const": {"value": 7.0}})
    assert a.__name__ == "always_one" and a(None, ["x"]) == [3.0]
    assert b.__name__ == "const" and b(None, ["x"]) == [7.0]
    assert one.__name__ == "one"  # the caller's function is never renamed in place
    with pytest.raises(ValueError, match="'always_one' is already registered"):
        register_reward("always_one", lambda prompts, completions, **kw: [])


def test_errors_are_clear():
    with pytest.raises(ValueError, match="not a registered name"):
        load_reward_funcs(["no_such_reward"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod': No module named 'no_such_pkg'"):
        load_reward_funcs(["no_such_pkg.mod:fn"])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_funcs(["grpokit.rewards.math:nope"])
    with pytest.raises(ValueError, match=r"reward_kwargs has entries for \['acuracy'\]"):
        load_reward_funcs(["accuracy"], reward_kwargs={"acuracy": {"mode": "math"}})
    with pytest.raises(ValueError, match="'accuracy': bad keyword arguments"):
        load_reward_funcs(["accuracy"], reward_kwargs={"accuracy": {"no_such_option": 1}})
    with pytest.raises(ValueError, match=r"regex: cannot compile '\('"):
        load_reward_funcs(["regex"], reward_kwargs={"regex": {"pattern": "("}})


def test_callables_pass_through_unchanged():
    def mine(prompts, completions, **kw):
        return [0.0] * len(completions)

    assert load_reward_funcs([mine]) == [mine]
    assert load_reward_funcs(mine) == [mine]


def test_unpicklable_registered_function_runs_in_this_process(clean_registry):
    # a lambda registered at run time cannot be pickled, nor rebuilt by a worker from an import
    register_reward("lam", lambda prompts, completions, **kw: [2.0] * len(completions))
    (f,) = load_reward_funcs(["lam"])
    assert f.__grpokit_spec__ == ("lam", {})
    with RewardRunner([f, "format"], num_workers=1) as runner:
        assert [p.in_pool for p in runner._plans] == [False, True]
        out = runner(["p"], ["<think>a</think><answer>b</answer>"])
    assert out.per_func.tolist() == [[2.0, 1.0]]
