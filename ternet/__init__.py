"""ternet: a standalone trainer for ternary neural networks (GXNOR-Net and beyond).

Forward and backward passes are written by hand: numpy/numba on the CPU, numba.cuda on the GPU.
Entry points: the `ternet` command (ternet.cli) and ternet.train.train(config).
"""
import os

# numba's OpenMP workers and OpenBLAS's threads take turns on the same cores; spinning OpenMP
# workers starve BLAS (measured 2x slower LeNet steps on 2 cores). Set before numba loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS's workers spin for 2^28 cycles after a GEMM by default; 2^4 lets the cores go to the
# numba kernels between GEMMs (LeNet step at batch 256: 2,144 -> 2,387 img/s on 2 cores).
# Only takes effect when ternet is imported before numpy.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
