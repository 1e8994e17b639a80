# Sourced by the step benchmarks: fedtune's products go through oneMKL from bench/.venv (the
# BLAS PyTorch is built with, so both sides use it) when it is there, unless FEDTUNE_BLAS
# names another (FEDTUNE_BLAS=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 measures OpenBLAS).
MKL=bench/.venv/lib/libmkl_rt.so.3
if [ -z "${FEDTUNE_BLAS:-}" ] && [ -f "$MKL" ]; then export FEDTUNE_BLAS="$PWD/$MKL"; fi
echo "fedtune BLAS: ${FEDTUNE_BLAS:-first found (oneMKL, then OpenBLAS)}" >&2
