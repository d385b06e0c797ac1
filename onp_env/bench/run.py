"""`onp bench`: the grid's models, the learned defenses' preparation (agent training) and one cell
per (model, fraction, defense), on a local process pool or a Ray cluster; each cell starts as soon as
its model (and its agent) exist, so heuristic cells run beside an agent's training.

Each finished cell is one JSON line in results.jsonl, appended and fsync'd by this driver alone, so a
killed run loses at most the cells in flight, and `--resume` skips the cells already there (none is
counted twice). A cell whose defense fails on its model with a one-line error (a repair that diverges,
say) goes to failed.jsonl instead and the grid goes on; the run then ends with that error, and
`--resume` tries the failed cells again. Seeds are per cell (the model's seed), never per worker:
executors give identical numbers. With Ray, artifacts and agents travel as bytes through the object
store, so workers need no shared disk."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import onp_env
from onp_env.artifacts import write_text_atomic
from onp_env.bench.config import BenchConfig, DefenseSpec, attack_key, model_key
from onp_env.config import LabConfig, from_dict, to_dict
from onp_env.errors import OnpError
from onp_env.registry import defense_class
from onp_env.results import (
    ANY,
    COUNT,
    FRACTION,
    MEASURES,
    NUMBER,
    TEXT,
    Schema,
    append,
    end_last_line,
    list_of,
    optional,
    read_rows,
)

RESULTS, CONFIG, FAILED = "results.jsonl", "config.json", "failed.jsonl"


def _cell_key(row: dict[str, Any]) -> str | None:
    c = row["config"]
    model = f"{c['data']['name']}/{c['model']['name']}/{attack_key(c['attack'])}/s{row['seed']}"
    key = f"{model}/{row['fraction']:g}/{row['defense']}"
    return None if row["key"] == key else f"its key {row['key']!r} does not match its fields ({key!r})"


_NAMED = Schema("named entry", {"name": TEXT})
_ATTACK = Schema("attack setting", {"name": TEXT}, optional={"label": optional(TEXT)})
_FINETUNED = Schema("fine-tuned model's measures", {"acc": FRACTION, "asr": FRACTION, "ra": FRACTION, "der": FRACTION})
CELL = Schema(
    "bench cell",
    {
        "key": TEXT, "defense": TEXT, "method": TEXT, "params": ANY, "fraction": FRACTION, "seed": COUNT,
        "config": Schema("lab config", {"data": _NAMED, "model": _NAMED, "attack": _ATTACK}),
        "acc": FRACTION, "asr": FRACTION, "ra": FRACTION, "der": FRACTION, "before": MEASURES,
        "pruned": COUNT, "seconds": NUMBER, "units": list_of(COUNT),
    },
    optional={"finetuned": optional(_FINETUNED.problem), "preset": optional(TEXT)},
    consistent=_cell_key,
)  # fmt: skip
"""A row of results.jsonl: one defense on one model at one defense-data fraction."""

FAILED_CELL = Schema("failed bench cell", {"key": TEXT, "defense": TEXT, "fraction": FRACTION, "seed": COUNT,
                                           "error": TEXT})  # fmt: skip
"""A row of failed.jsonl: a cell whose defense stopped with an OnpError, and that error."""

FIX = "delete that line (`onp bench --resume` redoes its cell) or restore the file from its source"


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The cells of a results.jsonl, each checked (onp_env.results.read_rows)."""
    return read_rows(path, CELL, fix=FIX)


# --- what travels to a worker without a shared disk ---------------------------------------------
def pack(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes] | None, folder: Path) -> Path:
    """`folder` as packed elsewhere (kept if this machine has it already); names stay inside it."""
    if files is not None and not folder.exists():
        if not files:
            raise OnpError(f"nothing was shipped for {folder}: the driver's copy is empty")
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
        for name in files:
            if (
                Path(name).is_absolute()
                or ".." in Path(name).parts
                or not (tmp / name).resolve().is_relative_to(tmp.resolve())
            ):
                raise OnpError(f"refusing shipped file name {name!r}: it leaves {folder}")
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- the tasks (module level: they run in worker processes) -------------------------------------
def build_model_task(lab: dict[str, Any], threads: int, ship: bool) -> tuple[str, dict[str, bytes] | None]:
    from onp_env.zoo import build_artifact

    torch.set_num_threads(threads)
    path = build_artifact(from_dict(LabConfig, lab, "bench model"), progress=False)
    return str(path), pack(path) if ship else None


def prepare_task(spec: dict[str, Any], workdir: str, threads: int, ship: bool) -> tuple[dict[str, Any], Any]:
    """A learned defense's preparation (e.g. training its agent); its parameters for the cells."""
    torch.set_num_threads(threads)
    params = defense_class(spec["name"]).prepare(dict(spec["params"]), Path(workdir), progress=False)
    agent = params.get("agent")
    return params, pack(Path(agent)) if ship and agent else None


def cell_task(key: str, art: str, art_files: dict[str, bytes] | None, spec: dict[str, Any],
              params: dict[str, Any], agent_files: dict[str, bytes] | None, fraction: float, seed: int,
              workdir: str, threads: int, data_root: str | None,
              label: str | None = None) -> dict[str, Any]:  # fmt: skip
    from onp_env.artifacts import load_artifact
    from onp_env.defend import defend_artifact

    torch.set_num_threads(threads)
    art_path = unpack(art_files, Path(art))
    if agent_files is not None:
        params = {**params, "agent": str(unpack(agent_files, Path(params["agent"])))}
    out = Path(workdir) / "defenses" / key
    if not out.resolve().is_relative_to((Path(workdir) / "defenses").resolve()):  # labels are checked; be sure
        raise OnpError(f"cell {key!r} would write outside {workdir}")
    if out.exists():  # a cell killed after writing its folder and before its row: redo it
        shutil.rmtree(out)
    start = time.perf_counter()
    run = {**params, "defense_fraction": fraction, "seed": seed}
    try:
        _, report = defend_artifact(art_path, spec["name"], run, out, data_root=data_root, preset=spec.get("preset"))
    except OnpError as e:  # this defense on this model only (a diverging repair, say): the other cells go on
        return {"key": key, "defense": DefenseSpec(**spec).key, "fraction": fraction, "seed": seed, "error": str(e)}
    manifest = load_artifact(out).manifest
    config = manifest["config"]  # the grid's label: a model cached under another label is the same model
    config["attack"]["label"] = label
    return {
        "key": key, "defense": DefenseSpec(**spec).key, "method": spec["name"], "params": spec["params"],
        **({"preset": spec["preset"], "preset_params": report["details"].get("params")} if spec.get("preset") else {}),
        "fraction": fraction, "seed": seed, "config": config,
        **{k: report[k] for k in ("acc", "asr", "ra", "der", "before", "pruned", "seconds", "defense_images")},
        "finetuned": report.get("finetuned"), "units": manifest["defense"]["pruned_units"],
        "wall_seconds": round(time.perf_counter() - start, 2), "version": onp_env.__version__,
        "host": platform.node(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


# --- executors ------------------------------------------------------------------------------------
class _Deferred:
    """A task of the in-process executor: run when its result is asked for, one at a time, so that
    each finished cell is written before the next starts."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args


class _Queued:
    """A task of the local pool: waits in the pool's queue until `cpus` cores are free."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], cpus: int):
        self.fn, self.args, self.cpus = fn, args, cpus
        self.future: Future | None = None


class LocalExecutor:
    """A process pool of `workers` on this machine (spawned: no torch state is forked); one worker
    runs the tasks in this process instead (same per-cell seeds, so the same numbers).

    At most `workers` tasks run at once, and a task holds its `cpus` cores while it runs: it starts
    only when they are free (a task submitted later starts first if it fits), so a cell that runs two
    threads never shares two cores with two other tasks; a task asking for more than `cores` runs
    alone."""

    ships = False

    def __init__(self, workers: int, cores: int):
        self.pool = ProcessPoolExecutor(workers, get_context("spawn")) if workers > 1 else None
        self.workers, self.cores = workers, cores
        self.queue: list[_Queued] = []
        self.running: set[_Queued] = set()

    def submit(self, fn: Callable[..., Any], *args: Any, cpus: int = 1) -> _Queued | _Deferred:
        if self.pool is None:
            return _Deferred(fn, args)
        task = _Queued(fn, args, min(cpus, self.cores))
        self.queue.append(task)
        self._start()
        return task

    def _start(self) -> None:
        assert self.pool is not None
        for task in list(self.queue):
            busy = sum(t.cpus for t in self.running)
            if len(self.running) < self.workers and busy + task.cpus <= self.cores:
                self.queue.remove(task)
                self.running.add(task)
                task.future = self.pool.submit(task.fn, *task.args)

    def put(self, value: Any) -> Any:
        return value

    def completed(self, pending: set[Any]) -> Iterator[tuple[Any, Any]]:
        """(handle, result) as tasks finish, until `pending` is empty (tasks added to it meanwhile
        included); a task's exception is raised here."""
        while pending:
            deferred = [t for t in pending if isinstance(t, _Deferred)]
            if deferred:
                pending.discard(deferred[0])
                yield deferred[0], deferred[0].fn(*deferred[0].args)
                continue
            running = {t.future: t for t in pending if t.future is not None}
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                task = running[fut]
                pending.discard(task)
                self.running.discard(task)
                self._start()
                yield task, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise OnpError('--executor ray needs Ray: pip install "onp-env[ray]"') from None
    return ray


class RayExecutor:
    """Each task a Ray task with its CPU request, on the cluster at `address` or a local one."""

    ships = True

    def __init__(self, address: str | None):
        self.ray = ray_module()
        self.ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)

    def submit(self, fn: Callable[..., Any], *args: Any, cpus: int = 1) -> Any:
        return self.ray.remote(num_cpus=cpus)(fn).remote(*args)

    def put(self, value: Any) -> Any:
        """One copy in the object store, shared by every task it is passed to."""
        return self.ray.put(value) if value is not None else None

    def completed(self, pending: set[Any]) -> Iterator[tuple[Any, Any]]:
        """As LocalExecutor.completed."""
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.discard(ref)
                try:
                    result = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError as e:  # a worker's bad input stays one line
                    if isinstance(e.cause, OnpError):
                        raise OnpError(str(e.cause)) from None
                    raise
                yield ref, result

    def close(self) -> None:
        self.ray.shutdown()


# --- the driver ---------------------------------------------------------------------------------
def _grid(d: dict[str, Any]) -> dict[str, Any]:
    """What makes the numbers: the config without how many workers and threads ran it."""
    return {k: v for k, v in d.items() if k not in ("workers", "threads")}


def _key(lab: LabConfig, fraction: float, spec: DefenseSpec) -> str:
    """A cell's key in results.jsonl (CELL's consistency check rebuilds it from the row's fields)."""
    return f"{model_key(lab)}/{fraction:g}/{spec.key}"


def _check_out(cfg: BenchConfig, out: Path, resume: bool) -> None:
    saved = out / CONFIG
    if saved.is_file():
        if not resume:
            raise OnpError(f"{out} holds a benchmark already: pass --resume to continue it, or another --out")
        try:  # through the schema: a field added since the run started takes its default, as it did then
            before = to_dict(from_dict(BenchConfig, json.loads(saved.read_text()), str(saved)))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError, OnpError):
            raise OnpError(f"{saved} is corrupt: remove the folder or pass another --out") from None
        if _grid(before) != _grid(to_dict(cfg)):
            raise OnpError(
                f"{out} holds a benchmark of another config: resume it with that config, or use another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise OnpError(f"{out} exists and is not a benchmark folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnpError(f"cannot write {out} ({e.strerror}): pass another --out") from e
    write_text_atomic(saved, json.dumps(to_dict(cfg), indent=1))


def run_bench(cfg: BenchConfig, out: str | Path, executor: str = "local", address: str | None = None,
              workers: int | None = None, resume: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """Run (or continue) the grid into `out`; returns the path of results.md."""
    from onp_env.bench.report import write_report

    out = Path(out).resolve()  # workers (and Ray nodes) must not read it against their own directory
    if executor not in ("local", "ray"):
        raise OnpError(f"unknown executor '{executor}': choose local or ray")
    workers = cfg.workers if workers is None else workers
    if workers < 1:
        raise OnpError("--workers must be >= 1")
    labs, specs = cfg.labs(), cfg.defense_specs()
    learned = {s.key: s for s in specs if hasattr(defense_class(s.name), "prepare")}
    # an agent trains beside cells: the cores it keeps busy count like a cell's threads
    prep_cpus = {k: max(cfg.threads, getattr(defense_class(s.name), "prepare_cpus", lambda p: 1)(s.params))
                 for k, s in learned.items()}  # fmt: skip
    # a cell may keep more cores busy than its torch threads (ANP's `parallel`): the pool reserves them
    cell_cpus = {s.key: getattr(defense_class(s.name), "cell_cpus", lambda p, t: t)(s.params, cfg.threads)
                 for s in specs}  # fmt: skip
    threads = max(cfg.threads, cfg.train.threads, *prep_cpus.values())
    if executor == "local" and workers * threads > (os.cpu_count() or 1):
        raise OnpError(f"{workers} workers x {threads} threads exceed this machine's {os.cpu_count()} cores: "
                       "lower --workers, threads, train.threads or the agent config's threads or n_envs")  # fmt: skip
    if executor == "ray":
        ray_module()  # refused before anything is written
    _check_out(cfg, out, resume)
    pool: LocalExecutor | RayExecutor
    pool = LocalExecutor(workers, os.cpu_count() or 1) if executor == "local" else RayExecutor(address)
    results = out / RESULTS
    finished = {r["key"] for r in read_cells(results)}  # checked (and a cut-short line told) before it changes
    end_last_line(results)
    cells = [(lab, fraction, spec) for lab in labs for fraction in cfg.fractions for spec in specs]
    keys = {_key(*c) for c in cells}
    if foreign := sorted(finished - keys):
        raise OnpError(f"{results} holds {len(foreign)} cell(s) this grid does not have (first: {foreign[0]!r}): "
                       "it is another grid's file; resume with that grid's config or pass another --out")  # fmt: skip
    todo = [c for c in cells if _key(*c) not in finished]
    failed: list[dict[str, Any]] = []  # failed.jsonl keeps the last run's until this run has tried them again
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell", disable=not progress)
    needed = {model_key(c[0]): c[0] for c in todo}
    learned = {k: s for k, s in learned.items() if any(c[2].key == k for c in todo)}
    setup = tqdm(total=len(needed) + len(learned), desc="models and agents", disable=not progress, leave=False)
    # Cells are submitted as soon as what they need exists: heuristic cells run beside the agents'
    # training instead of waiting for it; per-cell seeds keep the numbers independent of the order.
    models: dict[str, tuple[str, Any]] = {}
    prepared: dict[str, tuple[dict[str, Any], Any]] = {}
    waiting, pending, role = list(todo), set(), {}

    def submit(what: tuple[str, str], fn: Callable[..., Any], *args: Any, cpus: int) -> None:
        handle = pool.submit(fn, *args, cpus=cpus)
        pending.add(handle)
        role[handle] = what

    def release() -> None:
        nonlocal waiting
        ready = [c for c in waiting if model_key(c[0]) in models and (c[2].key not in learned or c[2].key in prepared)]
        waiting = [c for c in waiting if c not in ready]
        for lab, fraction, spec in ready:
            key = _key(lab, fraction, spec)
            art, art_files = models[model_key(lab)]
            params, agent_files = prepared.get(spec.key, (spec.params, None))
            submit(("cell", key), cell_task, key, art, art_files, to_dict(spec), params, agent_files, fraction,
                   lab.seed, str(out), cfg.threads, lab.data.root, lab.attack.label if lab.attack else None,
                   cpus=cell_cpus[spec.key])  # fmt: skip

    try:  # the pool is closed whatever happens
        for k, s in learned.items():  # first: the longest tasks
            submit(("prepare", k), prepare_task, to_dict(s), str(out / "prepared"), cfg.threads, pool.ships,
                   cpus=prep_cpus[k])  # fmt: skip
        for key, lab in needed.items():
            submit(("model", key), build_model_task, to_dict(lab), cfg.train.threads, pool.ships,
                   cpus=cfg.train.threads)  # fmt: skip
        for handle, result in pool.completed(pending):
            kind, key = role.pop(handle)
            if kind == "cell":
                if "error" in result:
                    failed.append(result)
                    append(out / FAILED, result)
                else:
                    append(results, result)
                    finished.add(result["key"])
                bar.update()
                if finished:
                    write_report(out, plots=False)  # the table follows the data; plots at the end
                continue
            if kind == "model":
                models[key] = (result[0], pool.put(result[1]))
            else:
                prepared[key] = (result[0], pool.put(result[1]))
            setup.update()
            release()
    finally:
        setup.close()
        bar.close()
        pool.close()
    if failed:  # this run's failures alone: every earlier one was tried again
        order = {_key(*c): i for i, c in enumerate(cells)}
        failed.sort(key=lambda r: order[r["key"]])
        write_text_atomic(out / FAILED, "".join(json.dumps(r) + "\n" for r in failed))
    else:
        (out / FAILED).unlink(missing_ok=True)
    path = write_report(out) if finished else None
    if failed:
        first = failed[0]
        raise OnpError(f"{len(failed)} of {len(cells)} cells failed, the first in the grid {first['key']}: "
                       f"{first['error']}; {f'{path} lists them all' if path else 'no cell finished'} "
                       "(and failed.jsonl); --resume tries them again")  # fmt: skip
    assert path is not None  # a grid holds at least one cell
    return path
