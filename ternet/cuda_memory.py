"""A caching device allocator for numba (an External Memory Management plugin), and the peak
memory figure the benchmarks report.

A training step allocates the same buffers in the same order every time; cudaMalloc/cudaFree
for each of them costs far more than the small kernels that use them. Freed blocks go back to a
free list keyed by their rounded size and are handed out again. All ternet kernels run on the
default stream, so a block freed on the host while a queued kernel still reads it cannot be
overwritten before that kernel finishes (stream order), the same rule PyTorch's allocator uses.
Exercise: bench/bench_gpu.py (peak memory), tests marked gpu.
"""
import collections
import weakref

ROUND = 512


def _rounded(size):
    return max(ROUND, (size + ROUND - 1) // ROUND * ROUND)


def _addr(ptr):
    return int(ptr) if not hasattr(ptr, "value") else ptr.value


def _make_manager():
    from numba.cuda.cudadrv import driver

    class CachingMemoryManager(driver.NumbaCUDAMemoryManager):
        """numba's own manager, but freed device blocks are cached for reuse instead of freed."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.free_blocks = collections.defaultdict(list)
            self.in_use = self.peak = self.reserved = 0
            self.pool = None        # a Pool that serves every allocation while it is set (graph capture)
            self.recorder = None    # a list that allocations and frees are appended to (record)
            STATS.append(self)

        def _new(self, size, pool):
            ptr = self._attempt_allocation(lambda: self._malloc_or_trim(size))
            self.reserved += size
            if pool is not None:
                pool.spans.append((_addr(ptr), size))
            return ptr

        def memalloc(self, size):
            size = _rounded(size)
            pool, slot = self.pool, None
            if pool is not None and pool.planned is not None:
                if pool.base is None:
                    pool.base = self._new(pool.planned.total, pool)
                slot = pool.planned.take(size)
            if slot is not None:         # the plan's place for this allocation
                ptr = type(pool.base)(_addr(pool.base) + pool.planned.offsets[slot])
            else:
                free = (pool.free if pool is not None else self.free_blocks)[size]
                ptr = free.pop() if free else self._new(size, pool)
            self.in_use += size
            self.peak = max(self.peak, self.in_use)
            key = _addr(ptr)
            if self.recorder is not None:
                self.recorder.append(("a", key, size))

            def release(mgr=weakref.proxy(self), ptr=ptr, size=size, key=key, pool=pool, slot=slot):
                mgr.allocations.pop(key, None)
                mgr.in_use -= size     # back where it came from: a pool's blocks stay the pool's
                if mgr.recorder is not None:
                    mgr.recorder.append(("f", key))
                if slot is not None:
                    pool.planned.give(slot)
                else:
                    (pool.free if pool is not None else mgr.free_blocks)[size].append(ptr)

            mem = driver.AutoFreePointer(weakref.proxy(self.context), ptr, size, finalizer=release)
            self.allocations[key] = mem
            return mem.own()

        def _malloc_or_trim(self, size):
            try:
                return driver.driver.cuMemAlloc(size)
            except driver.CudaAPIError:
                self.trim()        # out of memory: give the cached blocks back and retry once
                return driver.driver.cuMemAlloc(size)

        def trim(self):
            for size, blocks in self.free_blocks.items():
                for ptr in blocks:
                    driver.driver.cuMemFree(ptr)
                    self.reserved -= size
            self.free_blocks.clear()

        def reset(self):
            self.trim()
            super().reset()

    return CachingMemoryManager


STATS = []
_installed = False
_manager = None     # the CachingMemoryManager class, once made


def install():
    """Use the caching allocator for every later numba device allocation. numba gives a context
    its memory manager when it creates it, so a context that already exists (CUDA used before
    this call: a test, a notebook) gets one here; its earlier arrays are freed as they were made."""
    global _installed, _manager
    from numba import config, cuda
    if config.ENABLE_CUDASIM:
        return
    if not _installed:
        _manager = _make_manager()
        cuda.set_memory_manager(_manager)
        _installed = True
    from numba.cuda.cudadrv import driver
    if not driver.driver.is_available:
        return
    for dev in list(driver.driver.devices.values()):     # the devices numba has opened, if any
        ctx = dev.primary_context
        if ctx is not None and not isinstance(ctx.memory_manager, _manager):
            mgr = _manager(context=ctx)
            ctx.push()      # (initialize asks the context for its memory size)
            try:
                mgr.initialize()
            finally:
                ctx.pop()
            ctx.memory_manager = mgr


def active():
    """Whether the current CUDA context allocates through the caching allocator (what a graph
    capture's pool needs: ternet.cuda_graph)."""
    from numba import cuda
    return _installed and isinstance(cuda.current_context().memory_manager, _manager)


def peak_bytes():
    """Peak device bytes held by live arrays since the last reset_peak() (0 if not installed)."""
    return max((m.peak for m in STATS), default=0)


def trim():
    """Give the cached free blocks back to the driver (graph pools keep theirs)."""
    for m in STATS:
        m.trim()


def reserved_bytes():
    """Device bytes the allocator holds from the driver now: live arrays, cached free blocks and
    graph pools (0 if not installed)."""
    return sum(m.reserved for m in STATS)


def in_use_bytes():
    """Device bytes held by live arrays now (0 if not installed)."""
    return sum(m.in_use for m in STATS)


class Pool:
    """Device blocks set apart for one captured CUDA graph (ternet.cuda_graph): while a Pool is
    active, every allocation comes from its free lists (or new memory), and a block allocated
    from it goes back to it when freed, whenever that is. Blocks freed during the capture are
    handed out again within it, in stream order, as in an ordinary step; none of them is ever
    handed to other work, which the graph's replays would overwrite.

    With a layout (plan(): where each allocation of a recorded step goes in one range) the
    capture's allocations are first placed by it (PlannedRange); a block freed there is reused by
    the allocations the plan puts over it, as a freed block by the next request of its size
    otherwise. A request the plan does not foresee gets a block of the pool's own."""

    def __init__(self, layout=None):
        self.free = collections.defaultdict(list)
        self.spans = []         # (address, bytes) of every block it allocated
        self.planned = PlannedRange(layout) if layout is not None and layout[2] > 0 else None
        self.base = None        # the planned range, allocated at the first request


class PlannedRange:
    """The planned part of a Pool. take(bytes): the i-th request gets the plan's offset i (returns
    i) when the plan's i-th allocation has that size and no allocation live in the range overlaps
    it; else None (the step did not go as recorded, and the pool serves it from its own blocks).
    give(i) when allocation i is freed."""

    def __init__(self, layout):
        self.sizes, self.offsets, self.total = layout
        self.next = 0
        self.live = {}          # i -> (start, end) offset of each live planned allocation

    def take(self, size):
        i, self.next = self.next, self.next + 1
        if i >= len(self.sizes) or self.sizes[i] != size:
            return None
        a, b = self.offsets[i], self.offsets[i] + size
        if any(a < end and start < b for start, end in self.live.values()):
            return None
        self.live[i] = (a, b)
        return i

    def give(self, i):
        self.live.pop(i, None)


def plan(events):
    """A layout for a step's allocations in one range, from the order they came in: events are
    ("a", key, bytes) for an allocation and ("f", key) for a free, as record() collects them (a key
    is an address, so it comes back after a free; frees of older blocks are ignored). Largest
    first, each allocation goes at the lowest offset no allocation overlapping its lifetime holds
    (greedy by size: close to the peak of live bytes, which no layout can go below). Returns
    (bytes of each allocation in order, their offsets, the range's bytes)."""
    life, now = [], {}          # [t0, t1, bytes] per allocation; key -> index of its live one
    for t, ev in enumerate(events):
        if ev[0] == "a":
            now[ev[1]] = len(life)
            life.append([t, len(events), _rounded(ev[2])])
        elif ev[1] in now:
            life[now.pop(ev[1])][1] = t
    offsets, placed, top = [0] * len(life), [], 0
    for i in sorted(range(len(life)), key=lambda i: (-life[i][2], i)):
        t0, t1, n = life[i]
        off = 0
        for a, b in sorted((a, b) for a, b, u0, u1 in placed if u0 < t1 and t0 < u1):
            if off + n <= a:
                break
            off = max(off, b)
        placed.append((off, off + n, t0, t1))
        offsets[i], top = off, max(top, off + n)
    return [v[2] for v in life], offsets, top


class record:
    """with record() as r: every allocation and free of the block, in order, in r.events (for plan)."""

    def __enter__(self):
        self.events = []
        for m in STATS:
            m.recorder = self.events
        return self

    def __exit__(self, *exc):
        for m in STATS:
            m.recorder = None


class use_pool:
    """with use_pool(pool): allocations of this block come from pool (no-op when not installed)."""

    def __init__(self, pool):
        self.pool, self.saved = pool, []

    def __enter__(self):
        self.saved = [(m, m.pool) for m in STATS]
        for m in STATS:
            m.pool = self.pool
        return self.pool

    def __exit__(self, *exc):
        for m, p in self.saved:
            m.pool = p


def reset_peak():
    for m in STATS:
        m.peak = m.in_use
