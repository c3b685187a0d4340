"""LIBERO episodes in parallel worker processes (one env per worker, rebuilt only when the task changes).

Jobs are (task spec, seed, perturbation); a worker runs the scripted expert (policy=None) or a policy
built in the worker from a picklable factory (so each process loads its own copy). Processes are spawned,
not forked: a forked MuJoCo/GL context is not safe to use.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable

_STATE: dict = {}


def _init(make_policy, image_size: int, render: bool, threads: int, max_steps: int | None = None,
          record: bool = False) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    _STATE.update(make_policy=make_policy, image_size=image_size, render=render, env=None, key=None, policy=None,
                  max_steps=max_steps, record=record)


def _env(task: str, perturbation: str):
    from .libero_env import LiberoEnv
    from .libero_perturb import check_perturbation
    if _STATE["key"] != task:
        if _STATE["env"] is not None:
            _STATE["env"].close()
        # the policies read the agent view only; demos also keep the wrist camera (eye_in_hand_rgb)
        _STATE["env"] = LiberoEnv(task, image_size=_STATE["image_size"], render=_STATE["render"],
                                  wrist=_STATE["record"], max_steps=_STATE["max_steps"])
        _STATE["key"] = task
    # a perturbation acts at reset only: another setting of the same task reuses the env (a build takes ~20 s)
    _STATE["env"].perturbation = check_perturbation(perturbation)
    return _STATE["env"]


def _run(job: tuple) -> dict:
    task, seed, perturbation, *opt = job  # opt: [keep_frames] for policy episodes drawn in a report
    env = _env(task, perturbation)
    if _STATE["record"]:
        from .libero_expert import record_episode
        r = record_episode(env, seed)
    elif _STATE["make_policy"] is None:
        from .libero_expert import run_episode
        r = run_episode(env, seed)
    else:
        from ..evaluation import run_policy_episode
        if _STATE["policy"] is None:
            _STATE["policy"] = _STATE["make_policy"]()
        r = run_policy_episode(env, _STATE["policy"], seed, keep_frames=bool(opt and opt[0]))
    r.update(task=task, task_name=env.task.name, perturbation=perturbation)
    return r


def run_parallel(jobs: list[tuple], workers: int = 2, make_policy: Callable | None = None, image_size: int = 128,
                 render: bool = False, progress: bool = True, desc: str = "libero",
                 max_steps: int | None = None, record: bool = False) -> list[dict]:
    """Run every (task, seed, perturbation[, keep_frames]) job; results in job order. Jobs of one task should be adjacent
    (each worker keeps its env between jobs of the same task). record=True: scripted-expert episodes with their
    frames, actions and states (libero_expert.record_episode), for demos."""
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True, disable=not progress)
    out: list = [None] * len(jobs)
    if workers <= 1:
        _init(make_policy, image_size, render or record, 1, max_steps, record)
        for i, j in enumerate(jobs):
            out[i] = _run(j)
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        # one job at a time: the bar moves per episode; workers still share a task's jobs (adjacent in order)
        with ctx.Pool(workers, initializer=_init, initargs=(make_policy, image_size, render or record, 1, max_steps,
                                                                     record)) as pool:
            for i, r in enumerate(pool.imap(_run, jobs, chunksize=1)):
                out[i] = r
                bar.update(1)
    bar.close()
    return out
