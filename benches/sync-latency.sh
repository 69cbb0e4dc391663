#!/usr/bin/env bash
# How long a new machine takes to sync a bucket of many small commits (one record and one pack each), and then
# to `verify` it (every pack's index), against an S3 server directly and through a proxy that holds every
# request LATENCY_MS, standing in for a remote service.
#
#   moto_server -H 127.0.0.1 -p 9000 &
#   AWS_ENDPOINT_URL=http://127.0.0.1:9000 bash benches/sync-latency.sh [COMMITS]     default 200
#
# SNAPSTORE_BIN picks the binary (default: the release build, made first); OTHER_BIN, when set, is timed in
# turn with it (a build before a change). LATENCY_MS defaults to 20; RUNS to 3. Needs python3 for the proxy.
set -euo pipefail
commits=${1:-200}
latency=${LATENCY_MS:-20}
runs=${RUNS:-3}
: "${AWS_ENDPOINT_URL:?set AWS_ENDPOINT_URL to the S3 server (http://HOST:PORT)}"
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_REGION=${AWS_REGION:-us-east-1}
bin=${SNAPSTORE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --locked -q
    bin=${CARGO_TARGET_DIR:-target}/release/snapstore
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/sync-latency.XXXXXX")
host=${AWS_ENDPOINT_URL#http://}
host=${host%/}
bucket=sync-latency-$$-$RANDOM
# Buckets are made with a plain PUT, as the tests make theirs (moto takes it unsigned).
printf 'PUT /%s HTTP/1.1\r\nHost: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$bucket" "$host" |
    python3 -c "import socket,sys; h,p='$host'.split(':'); s=socket.create_connection((h,int(p))); s.sendall(sys.stdin.buffer.read()); print(s.recv(100).split(b'\r\n')[0].decode())" >&2

cat >"$dir/proxy.py" <<'PY'
import asyncio, sys
listen, upstream, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
uhost, uport = upstream.split(':')
async def pipe(r, w, hold):
    try:
        while data := await r.read(65536):
            if hold:
                await asyncio.sleep(hold)
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection(uhost, int(uport))
    await asyncio.gather(pipe(cr, sw, delay), pipe(sr, cw, 0))
async def main():
    server = await asyncio.start_server(handle, '127.0.0.1', listen)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
PY
python3 "$dir/proxy.py" 0 "$host" "$(awk "BEGIN { print $latency / 1000 }")" >"$dir/port" &
proxy=$!
trap 'kill $proxy 2>/dev/null; rm -rf "$dir"' EXIT
while [ ! -s "$dir/port" ]; do sleep 0.1; done

url=s3://$bucket/repo
SNAPSTORE_CACHE_DIR=$dir/writer "$bin" --repo "$url" init >/dev/null
for i in $(seq "$commits"); do
    echo "state $i" | SNAPSTORE_CACHE_DIR=$dir/writer "$bin" --repo "$url" -q commit - --name state >/dev/null
done

echo "| binary | endpoint | sync of $commits records (s) | verify of $commits packs (s) | peak RSS (MiB) |"
echo "|---|---|---|---|---|"
for run in $(seq "$runs"); do
    for b in "$bin" ${OTHER_BIN:-}; do
        for via in direct proxy; do
            endpoint=$AWS_ENDPOINT_URL label=direct
            if [ "$via" = proxy ]; then
                endpoint=http://127.0.0.1:$(cat "$dir/port") label="proxy (+$latency ms a request)"
            fi
            rm -rf "$dir/new"
            timed() {
                AWS_ENDPOINT_URL=$endpoint SNAPSTORE_CACHE_DIR=$dir/new /usr/bin/time -f '%e %M' \
                    "$b" --repo "$url" "$@" 2>&1 >/dev/null | tail -1
            }
            sync=$(timed --json sync)
            verify=$(timed verify)
            rss=$(( (${sync#* } > ${verify#* } ? ${sync#* } : ${verify#* }) / 1024 ))
            echo "| $b | $label | ${sync% *} | ${verify% *} | $rss |"
        done
    done
done
