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
            STATS.append(self)

        def memalloc(self, size):
            size = _rounded(size)
            blocks = self.free_blocks[size]
            if blocks:
                ptr = blocks.pop()
            else:
                ptr = self._attempt_allocation(lambda: self._malloc_or_trim(size))
                self.reserved += size
            self.in_use += size
            self.peak = max(self.peak, self.in_use)
            key = int(ptr) if not hasattr(ptr, "value") else ptr.value

            def release(mgr=weakref.proxy(self), ptr=ptr, size=size, key=key):
                mgr.allocations.pop(key, None)
                mgr.in_use -= size
                mgr.free_blocks[size].append(ptr)

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


def install():
    """Use the caching allocator for every later numba device allocation (call before the first)."""
    global _installed
    if _installed:
        return
    from numba import config, cuda
    if config.ENABLE_CUDASIM:
        return
    cuda.set_memory_manager(_make_manager())
    _installed = True


def peak_bytes():
    """Peak device bytes held by live arrays since the last reset_peak() (0 if not installed)."""
    return max((m.peak for m in STATS), default=0)


def in_use_bytes():
    """Device bytes held by live arrays now (0 if not installed)."""
    return sum(m.in_use for m in STATS)


def reset_peak():
    for m in STATS:
        m.peak = m.in_use
