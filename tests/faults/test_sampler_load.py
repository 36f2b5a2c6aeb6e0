"""One Sampler under load: 8 threads x 200 calls (mixed seeds, numbers of images, attribute forms,
temperatures) return exactly (np.array_equal) what the same calls return one at a time."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from conftest import TINY_ATTRIBUTES

from toolkit.sampler import Sampler

THREADS, CALLS = 8, 200


def make_calls(count: int, seed: int) -> list[tuple]:
    """(attributes, n, seed, temperature, base) tuples in every accepted attribute form."""
    rng = random.Random(seed)
    names = list(TINY_ATTRIBUTES)

    def mapping():
        return {name: rng.randint(0, 1) for name in rng.sample(names, rng.randint(0, len(names)))}

    def array(rows):
        return np.array(
            [[rng.randint(0, 1) for _ in names] for _ in range(rows)],
            dtype=rng.choice([np.float32, np.int64, np.uint8]),
        )

    forms = [
        lambda: mapping(),
        lambda: [mapping() for _ in range(rng.randint(1, 4))],
        lambda: array(rng.randint(1, 4)),
        lambda: array(1)[0],  # one vector [A]
        lambda: array(rng.randint(1, 3)).tolist(),
    ]
    calls = []
    for _ in range(count):
        attributes = rng.choice(forms)()
        base = mapping() if isinstance(attributes, dict) and rng.random() < 0.3 else None
        calls.append((attributes, rng.randint(1, 6), rng.randint(0, 2**31), rng.choice([1.0, 0.5, 0.0, 2.0]), base))
    return calls


@pytest.mark.parametrize("io_binding", [False, True])  # session.run, and IO binding (a binding per call)
def test_eight_threads_of_200_calls_give_what_the_calls_give_one_at_a_time(tiny_onnx, io_binding):
    # batch_size 5: calls of up to 4 conditions x 6 images run in several batches
    sampler = Sampler(tiny_onnx, device="cpu", batch_size=5, io_binding=io_binding)
    calls = [make_calls(CALLS, seed=thread) for thread in range(THREADS)]
    started = time.perf_counter()
    expected = [
        [sampler.sample(a, n=n, seed=s, temperature=t, base=b) for a, n, s, t, b in thread] for thread in calls
    ]
    serial = time.perf_counter() - started

    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    gate = threading.Barrier(THREADS)

    def work(index: int) -> None:
        try:
            gate.wait()  # all threads start together
            for a, n, s, t, b in calls[index]:
                results[index].append(sampler.sample(a, n=n, seed=s, temperature=t, base=b))
        except BaseException as error:  # reported below, with the thread's index
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    parallel = time.perf_counter() - started
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert not errors, errors[:3]
    for index in range(THREADS):
        assert len(results[index]) == CALLS
        for call, (got, want) in enumerate(zip(results[index], expected[index])):
            assert got.dtype == np.uint8 and got.shape == want.shape, (index, call)
            assert np.array_equal(got, want), f"thread {index}, call {call}: {calls[index][call]}"
    print(f"{THREADS * CALLS} calls: {serial:.2f} s one at a time, {parallel:.2f} s on {THREADS} threads")
