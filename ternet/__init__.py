"""ternet: a standalone trainer for ternary neural networks (GXNOR-Net and beyond).

Forward and backward passes are written by hand: numpy/numba on the CPU, numba.cuda on the GPU.
Entry points: the `ternet` command (ternet.cli) and ternet.train.train(config).
"""
__version__ = "0.1.0"
