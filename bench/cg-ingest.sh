#!/bin/bash
# Instruction counts of lightrelay-publish under callgrind for a fixed number of ingested
# messages: cg-ingest.sh BIN_DIR OUT COUNT MODE (plain | history | ack) [PUBLISHERS]
# (issue 18: the ingest regression's profile; loopback only, bounded by COUNT and --duration).
# The load generator is GEN (default: this checkout's target/release/lightrelay).
set -u
bin=$1; out=$2; count=$3; mode=$4; pubs=${5:-50}
rp=$((26000 + RANDOM % 1000)); pp=$((27000 + RANDOM % 1000))
redis-server --port $rp --save '' --appendonly no --daemonize no >/dev/null 2>&1 & rpid=$!
sleep 0.3
extra=(); gen=(--redis redis://127.0.0.1:$rp)
case $mode in
  plain) ;;
  history) extra=(--history 100); gen+=(--history) ;;
  ack) gen=(--ack) ;;
  *) echo "mode: plain | history | ack" >&2; exit 2 ;;
esac
valgrind --tool=callgrind --callgrind-out-file=$out $bin/lightrelay-publish --listen 127.0.0.1:$pp \
  --redis-url redis://127.0.0.1:$rp --presence-interval 0 "${extra[@]}" >/tmp/cgp.$pp.log 2>&1 & ppid=$!
for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:$pp/healthz && break; sleep 0.3; done
sleep 1
${GEN:-$(dirname "$0")/../target/release/lightrelay} bench ingest --publish "ws://127.0.0.1:$pp/in{i}" "${gen[@]}" \
  --publishers $pubs --count $count --duration 120s --drain 30s --json 2>/dev/null \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print({k: r.get(k) for k in ("delivered","lost","ok","messages")})'
kill -INT $ppid; wait $ppid 2>/dev/null; kill $rpid; wait $rpid 2>/dev/null
callgrind_annotate $out 2>/dev/null | grep -m1 "PROGRAM TOTALS"
