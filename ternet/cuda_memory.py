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


def _make_manager():
    from numba.cuda.cudadrv import driver

    class CachingMemoryManager(driver.NumbaCUDAMemoryManager):
        """numba's own manager, but freed device blocks are cached for reuse instead of freed."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.free_blocks = collections.defaultdict(list)
            self.in_use = self.peak = self.reserved = 0
            self.pool = None        # a Pool that serves every allocation while it is set (graph capture)
            STATS.append(self)

        def memalloc(self, size):
            size = _rounded(size)
            pool = self.pool
            free = (pool.free if pool is not None else self.free_blocks)[size]
            if free:
                ptr = free.pop()
            else:
                ptr = self._attempt_allocation(lambda: self._malloc_or_trim(size))
                self.reserved += size
                if pool is not None:
                    pool.spans.append((int(ptr) if not hasattr(ptr, "value") else ptr.value, size))
            self.in_use += size
            self.peak = max(self.peak, self.in_use)
            key = int(ptr) if not hasattr(ptr, "value") else ptr.value

            def release(mgr=weakref.proxy(self), ptr=ptr, size=size, key=key, pool=pool):
                mgr.allocations.pop(key, None)
                mgr.in_use -= size     # back where it came from: a pool's blocks stay the pool's
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


def in_use_bytes():
    """Device bytes held by live arrays now (0 if not installed)."""
    return sum(m.in_use for m in STATS)


class Pool:
    """Device blocks set apart for one captured CUDA graph (ternet.cuda_graph): while a Pool is
    active, every allocation comes from its free lists (or new memory), and a block allocated
    from it goes back to it when freed, whenever that is. Blocks freed during the capture are
    handed out again within it, in stream order, as in an ordinary step; none of them is ever
    handed to other work, which the graph's replays would overwrite."""

    def __init__(self):
        self.free = collections.defaultdict(list)
        self.spans = []         # (address, bytes) of every block it allocated


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
