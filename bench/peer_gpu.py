"""Runs the PyTorch peer (../shared/bench/peer_torch.py, copied beside the checkout into
.data/peer/ for a device call) on exactly the configurations of bench_gpu.py, in fp32 (TF32 off)
and bf16 autocast. One JSON line per configuration.

    python bench/peer_gpu.py [path/to/peer_torch.py] [--bf16]    # --bf16: the bf16 runs only
"""
import importlib.util
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
path = args[0] if args else ".data/peer/peer_torch.py"
spec = importlib.util.spec_from_file_location("peer_torch", path)
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)

for mode in ("bf16-amp",) if "--bf16" in sys.argv else ("fp32-strict", "bf16-amp"):
    peer.run("vgg_gxnor_cifar", peer.vgg_gxnor(), (3, 32, 32), 10, 512, mode)
    peer.run("resnet18_224", peer.resnet18(), (3, 224, 224), 1000, 256, mode, steps=10, warm=3)
    peer.run("resnet18_64", peer.resnet18(), (3, 64, 64), 1000, 512, mode, steps=10, warm=3)
