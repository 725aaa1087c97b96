#!/usr/bin/env bash
# One prepared device check (issue 16): prints the machine, then runs benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--quick] [--device auto|cuda|cpu] [--out FILE.json]
# Offline: random-init weights, synthetic inputs. Installs the repo (pip install -e .) only when
# `import hardprobe` fails; torch must already be installed.
set -u
cd "$(dirname "$0")/.."
echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
if command -v lscpu >/dev/null 2>&1; then
  lscpu | grep -m1 "Model name" | sed 's/  */ /g'
  flags=$(lscpu | grep -m1 "^Flags" || true)
  for f in avx2 avx512_bf16 amx_bf16; do
    if grep -qw "$f" <<<"$flags"; then echo "cpu flag $f: yes"; else echo "cpu flag $f: no"; fi
  done
fi
echo "cores: $(nproc 2>/dev/null || echo ?)"
python3 --version
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| cuda available', torch.cuda.is_available())" \
  || { echo "torch is not importable: install torch first"; exit 2; }
if ! python3 -c "import hardprobe" 2>/dev/null; then
  echo "hardprobe not importable: pip install -e . (no new torch)"
  python3 -m pip install -q --no-deps -e . || python3 -m pip install -q -e . || exit 2
fi
echo "== gpu_check"
exec python3 benchmarks/gpu_check.py "$@"
