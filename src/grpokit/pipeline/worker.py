"""The generation worker: a process forked from the trainer (so it starts with the run's model,
engine, sampler, tools and environments as they are, nothing pickled), which samples what the
trainer requests, each request with the weights version it names.

    loop:  request = next from the trainer (None: stop; the trainer gone: stop)
           if request.version is not the model's: load it (WeightChannel.load), then send the
               probe report of that version
           send the request's trajectories (or the error, as text, and stop)

It ignores Ctrl-C (the trainer finishes its step and checkpoints, which needs the worker), runs
torch on one thread (GNU OpenMP cannot start a thread pool in a process forked after the parent
used one), and exits without running the trainer's exit handlers. What it sends is pickled here
(tensors by value), so what cannot cross is an error named in the trainer.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import traceback
from typing import Any, Callable

import torch

from grpokit.pipeline.weights import GENERATING, IDLE, PROBING, STAGE, STOPPED, WeightChannel


def worker_main(sample: Callable[[list[int], int], Any], model, after_load: Callable[[], None],
                channel: WeightChannel, requests, results, parent_pid: int) -> None:
    """`sample(rows, seed) -> Trajectories` (the run's own sampler); `model`: the module it
    samples from, loaded by `channel`; `after_load()`: tell the engine its weights changed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the trainer across the fork
    torch.set_num_threads(1)
    loaded = -1
    alive = lambda: os.getppid() == parent_pid  # noqa: E731 - re-parented: the trainer is gone
    try:
        while True:
            channel.flags[STAGE] = IDLE
            try:
                request = requests.get(timeout=1.0)
            except queue.Empty:
                if not alive():
                    return
                continue
            if request is None:
                return
            if request.version != loaded:
                channel.load(model, request.version, alive=alive)
                after_load()
                loaded = request.version
                channel.flags[STAGE] = PROBING
                results.put(("synced", pickle.dumps(channel.report(model, loaded))))
            channel.flags[STAGE] = GENERATING
            trajectories = sample(list(request.rows), request.seed)
            results.put(("result", request.index, pickle.dumps(trajectories)))
    except BaseException:  # noqa: BLE001 - sent to the trainer, which raises it (an environment that
        # cannot be pickled fails here, named, instead of in the queue's feeder thread)
        results.put(("error", traceback.format_exc()))
    finally:
        channel.flags[STAGE] = STOPPED
