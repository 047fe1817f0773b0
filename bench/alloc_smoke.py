"""On a real GPU: the caching allocator (ternet.cuda_memory) hands freed blocks back out and
reports peak bytes; prints one JSON line."""
import json
import time

import numpy as np
from numba import cuda

from ternet import cuda_memory

cuda_memory.install()
a = cuda.device_array(1 << 20, np.float32)
ptr = a.__cuda_array_interface__["data"][0]
del a
b = cuda.device_array(1 << 20, np.float32)
reused = b.__cuda_array_interface__["data"][0] == ptr
t0 = time.perf_counter()
for _ in range(2000):
    c = cuda.device_array((512, 64, 32, 32), np.float32)
    del c
per_alloc_us = (time.perf_counter() - t0) / 2000 * 1e6
print(json.dumps(dict(what="allocator", reused=bool(reused), peak_mib=cuda_memory.peak_bytes() / 2 ** 20,
                      alloc_free_us=round(per_alloc_us, 2))), flush=True)
