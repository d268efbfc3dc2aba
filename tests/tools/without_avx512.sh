#!/usr/bin/env bash
# Run a command as on a CPU without AVX-512 (CI may run on one): /proc/cpuinfo without the
# avx512*/amx* flags (so `--precision auto` picks float32, as it does there), oneDNN limited to
# AVX2 and OpenBLAS to its Haswell kernels. Needs user and mount namespaces (`unshare`).
# Limit: TensorFlow sends bfloat16 convolutions to oneDNN by the CPU's own cpuid flags, which a
# namespace cannot hide, and oneDNN held to AVX2 has no bfloat16 convolution: on an AVX-512 host
# the tests that ask for bfloat16 explicitly fail here ("could not create a primitive
# descriptor"), though a real CPU without AVX-512 runs them (TensorFlow keeps them off oneDNN).
# Example: tests/tools/without_avx512.sh .venv/bin/pytest -q tests/tasks/test_cluster.py
set -euo pipefail
cpuinfo=$(mktemp)
trap 'rm -f "$cpuinfo"' EXIT
sed -E '/^flags/ s/ (avx512[a-z_0-9]*|amx[a-z_0-9]*)//g' /proc/cpuinfo >"$cpuinfo"
export ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
exec unshare --user --map-root-user --mount -- sh -c \
  'mount --bind "$0" /proc/cpuinfo && exec "$@"' "$cpuinfo" "$@"
