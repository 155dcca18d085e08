#!/usr/bin/env bash
# One prepared check on a lent CUDA machine, at most 8 minutes: the GPU and torch's view of it, whether faiss can
# search the description index there (MEDZERO_INDEX_DEVICE), CPU and GPU class searches timed side by side, the
# throughput benchmark with ViT-B-16 in fp16, and the knowledge tests.
#
#   bash benchmarks/gpu_check.sh              # from the repository root
#
# Needs a Python with every package already installed: such a machine has no network, so nothing is installed
# here. It uses $PYTHON, else .venv/bin/python, which must exist (carried along, or made there from wheels). For the
# GPU index that environment needs faiss-gpu-cu12 in place of faiss-cpu (pyproject.toml's gpu extra says how);
# with faiss-cpu the faiss step says so and the GPU test skips. ViT-B-16 runs with random weights (no download).
# Logs go to $OUT when it is set, else to benchmarks/results/gpu_check-<time>/. Exits non-zero if a step failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
LOGS=${OUT:-benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
failed=()

step() {   # step NAME SECONDS COMMAND...: run it under a timeout, its output to the terminal and $LOGS/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "==== $name (at most ${seconds} s)"
    timeout "$seconds" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "==== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed+=("$name=$rc")
}

if [ ! -x "$PYTHON" ]; then
    echo "no Python at $PYTHON: carry a .venv with the project installed, or set PYTHON" | tee "$LOGS/summary.log"
    exit 2
fi

step nvidia-smi 20 nvidia-smi
step torch 40 "$PYTHON" -c "
import torch
print('torch', torch.__version__, 'built for CUDA', torch.version.cuda, 'available', torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(i, p.name, f'sm_{p.major}{p.minor}', f'{p.total_memory / 2**30:.0f} GiB', p.multi_processor_count, 'SMs')
"
step faiss 90 "$PYTHON" -c "
import time
import faiss, numpy as np
from app.knowledge.index import DescriptionIndex, DescriptionItem, faiss_gpu_count, faiss_gpu_problem
print('faiss', faiss.__version__, 'at', faiss.__file__)
print('GPUs faiss sees:', faiss_gpu_count())
started = time.perf_counter()
problem = faiss_gpu_problem()
print(f'trial search ({time.perf_counter() - started:.1f} s):', problem or 'ok, MEDZERO_INDEX_DEVICE=auto picks cuda')
if problem is None:
    rng, dim = np.random.default_rng(0), 512
    for rows in (100, 1000, 10000):
        vectors = rng.standard_normal((rows, dim)).astype(np.float32)
        items = [DescriptionItem('s', 'synthetic', 'c', 'c', str(i), 'curated') for i in range(rows)]
        for device in ('cpu', 'cuda'):
            index = DescriptionIndex('s', dim, device)
            index.replace_group('s', items, vectors, 'x')
            for n in (1, 64, 512):
                queries = rng.standard_normal((n, dim)).astype(np.float32)
                index.search_class(queries, 's', 'c', 8)                # the GPU copy is made here
                repeats = 50
                started = time.perf_counter()
                for _ in range(repeats):
                    index.search_class(queries, 's', 'c', 8)
                micros = (time.perf_counter() - started) / repeats * 1e6
                print(f'search_class {index.device:4} rows={rows:6} queries={n:4} k=8: {micros:9.1f} us a call')
"
step throughput 210 "$PYTHON" benchmarks/throughput.py --model-name ViT-B-16 --device cuda --precision fp16 \
    --images 512 --concurrency 1,16,64 --batch-size 64
step knowledge-tests 120 "$PYTHON" -m pytest tests/knowledge -q -x -rs -p no:cacheprovider

{
    echo "logs in $LOGS"
    if [ ${#failed[@]} -eq 0 ]; then echo "every step passed"; else echo "failed: ${failed[*]}"; fi
} | tee "$LOGS/summary.log"
[ ${#failed[@]} -eq 0 ]
