"""How ternet/data/fashion-mnist-small is made: the small real dataset `ternet train` uses when no
--data is given (1000 train + 200 test images per class of Fashion-MNIST, MIT licence).

Rebuild: `python -m ternet prep <ARGS below>`; tests/test_embedded.py checks it reproduces.
"""
SRC = "/usr/share/datasets/fashion-mnist"   # Debian package dataset-fashion-mnist
OUT = "ternet/data/fashion-mnist-small"
ARGS = ["mnist", SRC, OUT, "--classes", "fashion-mnist", "--per-class-limit",
        "train=1000,test=200", "--compress", "9", "--name", "fashion-mnist-small"]
COMMAND = "python -m ternet prep " + " ".join(ARGS)
