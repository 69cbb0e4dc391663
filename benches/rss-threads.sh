#!/usr/bin/env bash
# Peak RSS of a first commit, of a checkout into an empty directory and of `verify --read-data`, by core count,
# with --threads standing in for the cores of a larger machine as the defaults would set it: commit one worker
# per core (at most 16), checkout two (at most 32), verify one (at most 32, and one per pack). Data: a 512 MiB file and a tree of 60 files of
# 4 MiB, all from /dev/urandom (nothing compresses, so every new chunk's blob is as large as the chunk).
#
#   bash benches/rss-threads.sh [CORES...]        default: 2 4 8 16 32
#
# SNAPSTORE_BIN picks the binary (default: the release build, made first); SNAPSTORE_BENCH_DIR where the data
# goes (default: $TMPDIR). Prints a markdown table; each cell is the peak of REPEAT runs (default 2).
set -euo pipefail
cores=("${@:-}")
[ -z "${cores[*]}" ] && cores=(2 4 8 16 32)
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

echo "| cores (commit / checkout threads) | commit 512 MiB file | commit tree | checkout 512 MiB file | checkout tree | verify --read-data |"
echo "|---|---|---|---|---|---|"
for c in "${cores[@]}"; do
    commit_threads=$((c < 16 ? c : 16))
    checkout_threads=$((2 * c < 32 ? 2 * c : 32))
    row="| $c ($commit_threads / $checkout_threads) |"
    for what in image tree; do
        mib=$(peak "rm -rf '$dir/repo'; '$bin' --repo '$dir/repo' -q init" "$bin" --repo "$dir/repo" -q commit --threads "$commit_threads" "$dir/$what")
        row="$row $mib MiB |"
    done
    rm -rf "$dir/repo"
    "$bin" --repo "$dir/repo" -q init
    image=$("$bin" --repo "$dir/repo" -q commit "$dir/image")
    tree=$("$bin" --repo "$dir/repo" -q commit "$dir/tree")
    for id in "$image" "$tree"; do
        mib=$(peak "rm -rf '$dir/out'" "$bin" --repo "$dir/repo" -q checkout --threads "$checkout_threads" "$id" "$dir/out")
        row="$row $mib MiB |"
    done
    mib=$(peak : "$bin" --repo "$dir/repo" -q verify --read-data --threads "$((c < 32 ? c : 32))")
    echo "$row $mib MiB |"
done
