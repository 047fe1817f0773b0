#!/usr/bin/env bash
# The samplers' acceptance sweeps on one GPU (docs/results.md): prepares CIFAR-10 and MNIST with a
# validation split carved from train, then runs both sweeps at once (9 runs each, one process per
# run). Expects the numpy wheel installed as in gpu_session.sh. Results: $OUT/sweeps/<name>/.
set -u
OUT=${OUT:-/tmp/ternet-sweeps}
mkdir -p /tmp/src-cifar /tmp/src-mnist "$OUT/sweeps"
tar -xzf .data/cifar10-jpg.tar.gz -C /tmp/src-cifar
tar -xzf .data/mnist-png.tar.gz -C /tmp/src-mnist
python3 -m ternet prep folder /tmp/src-cifar /tmp/data-cifar-val --val-fraction 0.1 --name cifar10 --quiet
python3 -m ternet prep folder /tmp/src-mnist /tmp/data-mnist-val --channels 1 --val-fraction 0.1 --name mnist --quiet
python3 -m ternet sweep bench/sweeps/mnist-h200.toml --device cuda -j 9 --runs-dir "$OUT/sweeps" > "$OUT/mnist.log" 2>&1 &
python3 -m ternet sweep bench/sweeps/cifar10-h200.toml --device cuda -j 9 --runs-dir "$OUT/sweeps" > "$OUT/cifar.log" 2>&1
wait
tail -20 "$OUT/sweeps/mnist-h200/results.md" "$OUT/sweeps/cifar10-h200/results.md"
