"""The planned graph pool (ternet/cuda_memory.py: plan, PlannedRange; TERNET_GRAPH_POOL=planned)
without a GPU: a layout never puts two allocations alive at once over the same bytes, needs no more
than a little over the peak of live bytes, and the capture follows it only while the step goes as
recorded."""
import numpy as np
import pytest

from ternet import cuda_graph, cuda_memory
from ternet.cuda_memory import PlannedRange, plan


def random_step(rng, n=200):
    """An allocation/free order like a training step's: sizes over four orders of magnitude,
    some blocks still alive at the end, keys (addresses) reused after their frees."""
    events, live, free_keys, nxt = [], [], [], 0
    for _ in range(n):
        if live and rng.random() < 0.45:
            key = live.pop(int(rng.integers(len(live))))
            events.append(("f", key))
            free_keys.append(key)
        else:
            key = free_keys.pop() if free_keys and rng.random() < 0.5 else (nxt := nxt + 1)
            events.append(("a", key, int(rng.integers(1, 10 ** int(rng.integers(2, 6))))))
            live.append(key)
    return events


def lifetimes(events):
    life, now = [], {}
    for t, ev in enumerate(events):
        if ev[0] == "a":
            now[ev[1]] = len(life)
            life.append([t, len(events)])
        elif ev[1] in now:
            life[now.pop(ev[1])][1] = t
    return life


def live_peak(events):
    live = peak = 0
    sizes = {}
    for ev in events:
        if ev[0] == "a":
            sizes[ev[1]] = cuda_memory._rounded(ev[2])
            live += sizes[ev[1]]
            peak = max(peak, live)
        elif ev[1] in sizes:
            live -= sizes.pop(ev[1])
    return peak


@pytest.mark.parametrize("seed", range(6))
def test_a_plan_never_overlaps_live_allocations(seed):
    events = random_step(np.random.default_rng(seed))
    sizes, offsets, total = plan(events)
    life = lifetimes(events)
    assert len(sizes) == len(offsets) == len(life) == sum(ev[0] == "a" for ev in events)
    for i in range(len(life)):
        assert 0 <= offsets[i] and offsets[i] + sizes[i] <= total and sizes[i] % cuda_memory.ROUND == 0
        for j in range(i):
            in_time = life[i][0] < life[j][1] and life[j][0] < life[i][1]
            in_space = offsets[i] < offsets[j] + sizes[j] and offsets[j] < offsets[i] + sizes[i]
            assert not (in_time and in_space), (i, j)
    peak = live_peak(events)
    assert peak <= total <= 1.5 * peak          # no layout needs less than the live peak


def test_a_plan_reuses_freed_bytes():
    events = [("a", 1, 4096), ("a", 2, 1024), ("f", 1), ("a", 3, 2048), ("a", 4, 2048), ("f", 3), ("f", 4)]
    sizes, offsets, total = plan(events)
    assert sizes == [4096, 1024, 2048, 2048] and total == 5120       # 3 and 4 inside 1's bytes
    assert {offsets[2], offsets[3]} == {offsets[0], offsets[0] + 2048}


def test_the_capture_follows_the_plan_only_as_recorded():
    events = [("a", 1, 4096), ("a", 2, 1024), ("f", 1), ("a", 3, 2048), ("f", 3), ("f", 2)]
    layout = plan(events)
    r = PlannedRange(layout)
    a, b = r.take(4096), r.take(1024)
    assert (a, b) == (0, 1)
    r.give(a)
    assert r.take(2048) == 2                  # over allocation 0's bytes, freed as recorded
    r = PlannedRange(layout)
    a, b = r.take(4096), r.take(1024)
    assert r.take(2048) is None               # allocation 0 still alive: its bytes are not handed out
    r = PlannedRange(layout)
    assert r.take(512) is None                # sizes as planned only: this one goes to the pool's blocks,
    assert r.take(1024) == 1 and r.take(2048) == 2      # so allocation 0's bytes stay free for 2
    assert r.take(4096) is None               # past the plan's end


def test_step_graph_records_the_last_warmup_step_for_its_layout(monkeypatch):
    made, calls = [], []

    class FakeGraph:
        def __init__(self, fn, layout=None):
            made.append(layout)
            fn()

        def launch(self):
            pass

    class X(list):
        shape, dtype = (2, 1), np.float32

        def copy_to_device(self, a):
            pass

    monkeypatch.setattr(cuda_graph, "Graph", FakeGraph)
    monkeypatch.setattr(cuda_graph, "PLANNED", True)
    recorded = []
    monkeypatch.setattr(cuda_memory, "plan", lambda events: recorded.append(events) or ("layout", len(calls)))
    sg = cuda_graph.StepGraph(lambda x, y: calls.append(1), rows=2, warmup=2)
    sg.x, sg.y = X(), X()
    for _ in range(4):
        sg(X(), X([0, 0]))
    # warm-up steps 1 and 2 (the second recorded), the capture, one replay
    assert len(calls) == 3 and len(recorded) == 1 and made == [("layout", 2)]


def test_an_empty_layout_leaves_the_pool_to_its_free_lists():
    assert cuda_memory.Pool(plan([])).planned is None and cuda_memory.Pool().planned is None
    assert cuda_memory.Pool(plan([("a", 1, 10)])).planned.total == cuda_memory.ROUND
