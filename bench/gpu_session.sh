#!/usr/bin/env bash
# Everything the GPU path needs checked and timed, in one device call (see docs/performance.md):
#   bash bench/gpu_session.sh [profile|mma|bench|graph|peer|ab|tests|all ...]   (timings first, then the
#   tests; TEST_LIMIT s each; ROUNDS rounds of bench_gpu.py, 3 by default). mma: bench/mma_check.py. profile: every kernel's GPU time in one vgg-gxnor step at batch 64,
#   128, 512 (bench/profile_kernels.py) and the first layer's kernels (bench/first_layer.py); graph: the trainer's loop at batch 64 and 128, eager and
#   replayed (bench/bench_graph.py).
# ab: this code against an earlier commit's copy in .data/base (made here with
#   `rm -rf .data/base && mkdir -p .data/base && git archive REV bench ternet | tar -x -C .data/base`,
#   carried with the call), `bench_gpu.py $AB` (default resnet18-64) alternating, AB_ROUNDS pairs.
# Expects the numpy 2.4.6 wheel in .whl/ (the host's numpy 2.5 breaks numba-cuda 0.30) and the
# PyTorch peer in .data/peer/. Logs go to $OUT (default /tmp/ternet-gpu).
set -u
OUT=${OUT:-/tmp/ternet-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
what=${*:-all}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import numba, numba_cuda, numpy; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'numpy', numpy.__version__)"
case " $what " in *" profile "*|*" all "*)
    python3 bench/profile_kernels.py --batch 64 128 512 2>&1 | tee "$OUT/profile.log" | tail -30
    python3 bench/first_layer.py 2>&1 | tee "$OUT/first_layer.log" | tail -7 ;;
esac
case " $what " in *" mma "*|*" all "*)
    # the tensor-core kernels against the pure-numba ones (checks), then their times per layer
    python3 bench/mma_check.py 2>&1 | tee "$OUT/mma_check.log" | grep -v '"tc": false' | cut -c1-240 ;;
esac
case " $what " in *" bench "*|*" all "*)
    # the step eager and replayed; then ternet train --save-memory on: its peak and what the extra
    # first-layer forward costs
    python3 bench/bench_gpu.py --rounds "${ROUNDS:-3}" --graph both vgg resnet18-64 resnet18-224 2>&1 | tee "$OUT/bench_gpu.log" | tail -7
    python3 bench/bench_gpu.py --rounds "${SM_ROUNDS:-1}" --save-memory --graph both vgg resnet18-64 resnet18-224 2>&1 | tee -a "$OUT/bench_gpu.log" | tail -7
    # the replayed step with the pool's free lists only (TERNET_GRAPH_POOL=exact; planned is the
    # default): graph_pool_gib against the planned layout's in the runs above
    TERNET_GRAPH_POOL=exact python3 bench/bench_gpu.py --rounds 1 --save-memory --graph on vgg resnet18-64 resnet18-224 2>&1 | tee -a "$OUT/bench_gpu.log" | grep '^{' | cut -c1-400 ;;
esac
case " $what " in *" ab "*)
    for r in $(seq "${AB_ROUNDS:-3}"); do
        (cd .data/base && python3 bench/bench_gpu.py ${AB:-resnet18-64} 2>&1 | grep '^{' | sed 's/^/before /')
        python3 bench/bench_gpu.py ${AB:-resnet18-64} 2>&1 | grep '^{' | sed 's/^/after  /'
    done | tee "$OUT/ab.log" ;;
esac
case " $what " in *" graph "*|*" all "*)
    for b in 64 128; do python3 bench/bench_graph.py --batch $b --rounds 1 2>&1 | grep '^{' ; done | tee "$OUT/graph.log" ;;
esac
case " $what " in *" peer "*|*" all "*)
    python3 bench/peer_gpu.py 2>&1 | grep '^{' | tee "$OUT/peer.log" ;;
esac
case " $what " in *" tests "*|*" all "*)
    timeout ${TEST_LIMIT:-400} python3 -m pytest -q -x -m gpu tests/test_gpu_full.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
    timeout ${TEST_LIMIT:-400} python3 -m pytest -q tests/test_launch.py tests/test_cuda_*.py tests/test_samplers_cuda.py tests/test_device_data.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5 ;;
esac

