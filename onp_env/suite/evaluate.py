"""The standard evaluation: every model of a split, one row per model, replayable.

A row holds the model's stable name and weights hash, the policy's action sequence, the defense-set ACC
and ASR before and after (the env's own measurements, on which its reward is computed), the episode's
return, steps and seconds, and the library version and env settings it ran under. `validate` replays
the actions in a fresh env and recomputes every number: a row that was edited, or comes from another
suite version or zoo, fails with the model it names."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from onp_env.config import to_dict
from onp_env.env.config import EnvConfig
from onp_env.errors import OnpError
from onp_env.metrics import der
from onp_env.results import COUNT, FRACTION, REAL, TEXT, Schema, append, list_of, read_rows
from onp_env.suite.policies import Policy
from onp_env.suite.spec import SPLITS, get_suite

MAX_STEPS = 10_000
"""More steps than any suite episode takes (its step limit is 2 * ceil(budget * units) + 16)."""


def _consistent(row: dict[str, Any]) -> str | None:
    if row["steps"] > MAX_STEPS or len(row["actions"]) != row["steps"]:
        return f"holds {len(row['actions'])} actions for {row['steps']} steps (at most {MAX_STEPS})"
    if not row["model"].startswith(f"{row['suite']}/{row['split']}/"):
        return f"names model {row['model'][:80]!r}, which is not of {row['suite']}/{row['split']}"
    return None


ROW = Schema(
    "suite row",
    {"suite": TEXT, "env_id": TEXT, "split": TEXT, "model": TEXT, "policy": TEXT, "seed": COUNT,
     "actions": list_of(COUNT), "steps": COUNT, "return": REAL, "acc_before": FRACTION, "asr_before": FRACTION,
     "acc_after": FRACTION, "asr_after": FRACTION, "der": FRACTION, "pruned": COUNT, "seconds": REAL,
     "library": TEXT, "weights_sha256": TEXT, "zoo": TEXT},
    consistent=_consistent,
    optional={"train_steps": COUNT},
)  # fmt: skip
FIX = "rows come from `onp suite evaluate`, unedited: run it again"
TOLERANCE = 1e-5
"""How far a replayed number may fall from the row's (evaluation is deterministic on one machine; float
sums may differ in the last bits elsewhere)."""


@functools.lru_cache(maxsize=16)
def _split_names(suite: str, split: str) -> frozenset[str]:
    """The stable names of a suite split's models (its recipe draws them: worth doing once)."""
    return frozenset(name for name, _ in get_suite(suite).labs(split))


def _episode(env: Any, policy: Policy | None, seed: int, model: str, actions: list[int] | None = None) -> dict:
    """One episode on `model`, by `policy` or by replaying `actions`; the row's measured fields."""
    start = time.perf_counter()
    obs, info = env.reset(seed=seed, options={"model": model})
    e = env.unwrapped
    acc0, asr0 = info["acc"], info.get("asr")
    if policy is not None and hasattr(policy, "start"):
        policy.start(env)
    taken: list[int] = []
    total, done = 0.0, False
    while not done:
        if actions is not None:
            if len(taken) == len(actions):
                raise OnpError(f"{model}: the row's {len(actions)} actions end before the episode does; {FIX}")
            a = actions[len(taken)]
        else:
            assert policy is not None
            a = policy.act(env, obs, info)
        index = e.discrete_action(a)
        if not info["action_mask"][index]:
            who = "the row's" if actions is not None else "the policy's"
            raise OnpError(f"{model}: {who} action {index} at step {len(taken)} is masked (a padding slot or a pruned "
                           "unit): a policy must choose among info['action_mask'] (env.action_masks())")  # fmt: skip
        taken.append(index)
        obs, reward, term, trunc, info = env.step(index)
        total += float(reward)
        done = term or trunc
    if actions is not None and len(taken) != len(actions):
        raise OnpError(f"{model}: the episode ended after {len(taken)} of the row's {len(actions)} actions; {FIX}")
    before, after = {"acc": acc0, "asr": asr0}, {"acc": info["acc"], "asr": info.get("asr")}
    return {"actions": taken, "steps": len(taken), "return": total, "acc_before": acc0, "asr_before": asr0,
            "acc_after": info["acc"], "asr_after": info.get("asr"), "der": der(before, after),
            "pruned": int(info["pruned"]), "seconds": round(time.perf_counter() - start, 4)}  # fmt: skip


def make_env(suite: str, split: str, device: str = "cpu", cache: str | Path | None = None, progress: bool = True,
             models: list[str] | None = None):  # fmt: skip
    from onp_env.suite.envs import SuiteEnv

    return SuiteEnv(suite, split, device=device, cache=cache, progress=progress, models=models)


def evaluate(policy: Policy, suite: str, split: str, *, name: str, seed: int = 0, models: list[str] | None = None,
             out: Path | None = None, env: Any = None, progress: bool = True, train_steps: int | None = None,
             **env_kwargs: Any) -> list[dict]:  # fmt: skip
    """Run `policy` (called `name` in the rows) once on every model of `split` (or the named `models`),
    each episode reset with `seed`; the rows, each also appended to `out` (JSON lines) as it finishes.
    Pass `env` to reuse a SuiteEnv of that split; `train_steps`, the env steps a learned policy trained
    for, goes into the rows for the report."""
    from onp_env import __version__

    spec = get_suite(suite)
    if hasattr(policy, "requires"):  # a policy that cannot act in this suite says so before it is built
        policy.requires(spec.env)
    env = env if env is not None else make_env(spec.name, split, progress=progress, models=models, **env_kwargs)
    e = env.unwrapped
    if (e.suite.name, e.split) != (spec.name, split):
        raise OnpError(f"the env given holds {e.suite.name}/{e.split}, not {spec.name}/{split}")
    names = models if models is not None else list(e.names)
    if not names or len(set(names)) != len(names):
        raise OnpError(f"models must name each model of {spec.name}/{split} at most once, and some: got {names[:5]}")
    outside = sorted(set(names) - set(e.names))
    if outside:
        held = "the env given holds" if len(e.names) < len(spec.labs(split)) else "its models are"
        raise OnpError(f"model {outside[0]!r} is not in {spec.name}/{split}: {held} "
                       f"{e.names[0]} .. {e.names[-1]} (`onp suite list {spec.name}`)")  # fmt: skip
    by_name = {m.name: m for m in e.models}
    rows = []
    for model in tqdm(names, desc=f"{name} on {spec.name}/{split}", disable=not progress):
        row = {"suite": spec.name, "env_id": spec.gym_id, "split": split, "model": model, "policy": name,
               "seed": seed, **_episode(env, policy, seed, model), "library": __version__, "torch": torch.__version__,
               "weights_sha256": by_name[model].sha256, "zoo": by_name[model].status,
               "env": dataclasses.asdict(e.cfg)}  # fmt: skip
        if train_steps is not None:
            row["train_steps"] = train_steps
        rows.append(row)
        if out is not None:
            append(Path(out), row)
    return rows


def read_suite_rows(path: Path) -> list[dict]:
    """The rows of a file of `onp suite evaluate`, each checked (schema, its suite, split and model known)
    before anything is built; a missing or empty file is an error, not zero rows."""
    path = Path(path)
    if not path.is_file():
        raise OnpError(f"{path}: no such rows file; {FIX}")
    rows = read_rows(path, ROW, fix=FIX)
    if not rows:
        raise OnpError(f"{path} holds no rows; {FIX}")
    seen = set()
    for i, r in enumerate(rows, 1):
        try:
            spec = get_suite(r["suite"])
        except OnpError as e:
            raise OnpError(f"{path}, row {i}: {e}") from None
        if r["split"] not in SPLITS or r["env_id"] != spec.gym_id:
            raise OnpError(f"{path}, row {i}: split {r['split']!r} of {r['env_id']!r} is not one of {spec.gym_id}'s "
                           f"({', '.join(SPLITS)}); {FIX}")  # fmt: skip
        if r["model"] not in _split_names(spec.name, r["split"]):
            raise OnpError(f"{path}, row {i}: no model {r['model'][:80]!r} in {spec.name}/{r['split']}; {FIX}")
        episode = (spec.name, r["split"], r["policy"], r["seed"], r["model"])
        if episode in seen:
            raise OnpError(f"{path}, row {i}: a second row of {r['policy']} (seed {r['seed']}) on {r['model']}: "
                           "keep one row per policy, seed and model")  # fmt: skip
        seen.add(episode)
    return rows


def validate(rows: list[dict], device: str = "cpu", cache: str | Path | None = None, progress: bool = True) -> int:
    """Replay every row's actions and recompute its numbers; the number of rows checked. OnpError on the
    first row that does not reproduce: made on other weights than those built here (its zoo), under
    other env settings, or with numbers that the actions do not give (the field and both values). The
    policy's name and seed are labels: replaying the actions does not need them, so they are not checked."""
    if not rows:
        raise OnpError(f"no rows to validate; {FIX}")
    named: dict[tuple[str, str], list[str]] = {}  # only the models the rows name are built
    for r in rows:
        if r["model"] not in _split_names(r["suite"], r["split"]):
            raise OnpError(f"row of {r['model']!r}: no such model in {r['suite']}/{r['split']}; {FIX}")
        models = named.setdefault((r["suite"], r["split"]), [])
        models += [r["model"]] if r["model"] not in models else []
    envs: dict[tuple[str, str], Any] = {}
    for r in tqdm(rows, desc="validate", disable=not progress):
        key = (r["suite"], r["split"])
        if key not in envs:
            envs[key] = make_env(*key, device=device, cache=cache, progress=progress, models=named[key])
        env = envs[key]
        e = env.unwrapped
        built = next(m for m in e.models if m.name == r["model"])
        if r["weights_sha256"] != built.sha256:
            raise OnpError(f"row of {r['model']} was made on other weights ({r['weights_sha256'][:12]}) than those "
                           f"built here ({built.sha256[:12]}, {built.status} the manifest): replay it on the machine "
                           "that made it, or evaluate again here")  # fmt: skip
        here = to_dict(e.cfg)
        if not isinstance(r.get("env"), dict):
            raise OnpError(f"row of {r['model']} holds no env settings: it comes from another version of the suite; "
                           "evaluate again with this one")  # fmt: skip
        # a setting added since the row was made reads as its default, which keeps the old observation
        made = EnvConfig.load({**r["env"], "device": "cpu"}, f"row of {r['model']}: env")  # any device
        if {**to_dict(made), "device": ""} != {**here, "device": ""}:
            raise OnpError(f"row of {r['model']} was made under other env settings than {key[0]}'s: it comes from "
                           "another version of the suite; evaluate again with this one")  # fmt: skip
        got = _episode(env, None, r["seed"], r["model"], list(r["actions"]))
        for k in ("steps", "pruned", "return", "acc_before", "asr_before", "acc_after", "asr_after", "der"):
            if not math.isclose(float(got[k]), float(r[k]), rel_tol=0, abs_tol=TOLERANCE):
                raise OnpError(f"row of {r['model']} ({r['policy']}, seed {r['seed']}): {k} replays as "
                               f"{got[k]:.6g}, the row says {r[k]:.6g}; {FIX}")  # fmt: skip
    return len(rows)


__all__ = ["ROW", "evaluate", "make_env", "read_suite_rows", "validate"]
