#!/usr/bin/env bash
# Run HERE, in the checkout the GPU session's device calls send, before the first call:
#   bash benchmarks/gpu_prepare.sh            # data + wheels, then the size that will travel
#   bash benchmarks/gpu_prepare.sh --no-wheels
# The device machine reaches no network and ../shared does not travel, so what the runbook
# (benchmarks/README.md) needs is put in folders of the repo that git ignores, and each call
# names them in `carry`:
#   .gpu-data/cifar10-jpg.tar.gz  the CIFAR-10 JPEG copy (19 MB; gpu_session.py extracts it)
#   .whl/                         jsonargparse and its two missing dependencies (1 MB): the
#                                 device image lacks them, and without them the CLI's test
#                                 modules fail to import, which stops `pytest -m gpu` at
#                                 collection. The library itself and the benchmarks need none.
# Wheels are fetched with the registry's own client, exactly as the device README says
# (Python 3.12, manylinux, no dependencies), and only when .whl/ lacks them.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

WHEELS=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)
SHARED=${SIMCLR_SHARED_DATA:-../shared/data}
PYTHON=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
with_wheels=1
[[ "${1:-}" == "--no-wheels" ]] && with_wheels=0

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
ignore() { grep -qxF "$1" "$exclude" 2>/dev/null || echo "$1" >>"$exclude"; }

# -- data --------------------------------------------------------------------------------------
ignore /.gpu-data/
mkdir -p .gpu-data
if [[ -f "$SHARED/cifar10-jpg.tar.gz" ]] &&
    ! cmp -s "$SHARED/cifar10-jpg.tar.gz" .gpu-data/cifar10-jpg.tar.gz; then
    cp "$SHARED/cifar10-jpg.tar.gz" .gpu-data/cifar10-jpg.tar.gz
fi
if [[ ! -f .gpu-data/cifar10-jpg.tar.gz ]]; then
    echo "gpu_prepare.sh: error: no $SHARED/cifar10-jpg.tar.gz to copy: set SIMCLR_SHARED_DATA" \
        "to the folder that holds it" >&2
    exit 1
fi
echo "1fd928ad2fe24946899ef04731ca16ff  .gpu-data/cifar10-jpg.tar.gz" | md5sum -c --quiet

# -- wheels ------------------------------------------------------------------------------------
if ((with_wheels)); then
    ignore /.whl/
    mkdir -p .whl
    for spec in "${WHEELS[@]}"; do
        name=${spec%%==*}
        file=${name//-/_}-${spec##*==}-
        # keep one version of each: two stop the whole install on the device
        for old in .whl/"${name//-/_}"-*.whl; do
            [[ -e "$old" && "$old" != .whl/"$file"* ]] && rm -v "$old"
        done
        compgen -G ".whl/$file*.whl" >/dev/null && continue
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
    done
    ls -l .whl
fi

# -- what will travel --------------------------------------------------------------------------
bytes() { xargs -0 -r du -b -- 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
tracked=$(git ls-files -z | bytes)
untracked=$(git ls-files -z --others --exclude-standard | bytes)
carried=0
carry=(.gpu-data)
((with_wheels)) && carry+=(.whl)
for dir in "${carry[@]}"; do
    carried=$((carried + $(du -sb "$dir" | cut -f1)))
done
total=$((tracked + untracked + carried))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "travels with each call: tracked $(mib "$tracked"), untracked not ignored" \
    "$(mib "$untracked"), carried (${carry[*]}) $(mib "$carried"): total $(mib "$total")" \
    "of the 64 MiB limit"
if ((total > LIMIT)); then
    echo "too large: ignore or carry less before the first call" >&2
    exit 1
fi
