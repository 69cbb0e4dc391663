#!/usr/bin/env bash
# Peak RSS (KiB, /usr/bin/time's %M) of a first commit and of a checkout into an empty directory, by thread
# count, with --threads standing in for the cores of a larger machine: commit uses one worker per core and
# checkout two, as their defaults do. Data: a 512 MiB file and a tree of 60 files of 4 MiB, all from
# /dev/urandom (nothing compresses, so every new chunk's blob is as large as the chunk).
#
#   bash benches/rss-threads.sh [CORES...]        default: 2 4 8 16
#
# SNAPSTORE_BIN picks the binary (default: the release build, made first); SNAPSTORE_BENCH_DIR where the data
# goes (default: $TMPDIR). Prints a markdown table; each cell is the peak of REPEAT runs (default 2).
set -euo pipefail
cores=("${@:-}")
[ -z "${cores[*]}" ] && cores=(2 4 8 16)
repeat=${REPEAT:-2}
bin=${SNAPSTORE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --locked -q
    bin=${CARGO_TARGET_DIR:-target}/release/snapstore
fi
dir=$(mktemp -d "${SNAPSTORE_BENCH_DIR:-${TMPDIR:-/tmp}}/rss-threads.XXXXXX")
trap 'rm -rf "$dir"' EXIT
head -c $((512 << 20)) /dev/urandom >"$dir/image"
mkdir "$dir/tree"
for i in $(seq 60); do head -c $((4 << 20)) /dev/urandom >"$dir/tree/f$i"; done

# Peak RSS in MiB of the command, the largest of $repeat runs; $1 is run before each (to reset state).
peak() {
    local reset=$1 max=0 kib
    shift
    for _ in $(seq "$repeat"); do
        eval "$reset"
        kib=$(/usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -1)
        [ "$kib" -gt "$max" ] && max=$kib
    done
    echo $((max / 1024))
}

echo "| cores (commit / checkout threads) | commit 512 MiB file | commit tree | checkout 512 MiB file | checkout tree |"
echo "|---|---|---|---|---|"
for c in "${cores[@]}"; do
    row="| $c ($c / $((2 * c))) |"
    for what in image tree; do
        mib=$(peak "rm -rf '$dir/repo'; '$bin' --repo '$dir/repo' -q init" "$bin" --repo "$dir/repo" -q commit --threads "$c" "$dir/$what")
        row="$row $mib MiB |"
    done
    rm -rf "$dir/repo"
    "$bin" --repo "$dir/repo" -q init
    image=$("$bin" --repo "$dir/repo" -q commit "$dir/image")
    tree=$("$bin" --repo "$dir/repo" -q commit "$dir/tree")
    for id in "$image" "$tree"; do
        mib=$(peak "rm -rf '$dir/out'" "$bin" --repo "$dir/repo" -q checkout --threads $((2 * c)) "$id" "$dir/out")
        row="$row $mib MiB |"
    done
    echo "$row"
done
