#!/usr/bin/env bash
# The restart gap: an acked `lightrelay pub` at ~400 msg/s on loopback, Redis SIGKILLed and
# restarted OUTAGE seconds later (default 1); counts what the publisher had acknowledged that a
# `lightrelay sub` never got (published while the subscribe server held no subscription).
#
#   OUTAGE=2.7 bench/restart_gap.sh target/release 8     # binaries' directory, runs
#   KEEP=1 ...                                            # print both servers' logs after a loss
#   HISTORY=1000 ...                                      # both servers with --history 1000
#
# Bounded: 2,000 messages and a 60 s timeout per run; only the processes started here are
# stopped, by PID. Ports are random in 20000-30002 on 127.0.0.1.
set -u
BIN=${1:?usage: bench/restart_gap.sh BIN_DIR RUNS}; RUNS=${2:-5}
HIST=(); [ -n "${HISTORY:-}" ] && HIST=(--history "$HISTORY")
for run in $(seq 1 "$RUNS"); do
  d=$(mktemp -d); RP=$((20000 + RANDOM % 10000)); SP=$((RP+1)); PP=$((RP+2))
  redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --dir $d >/dev/null 2>&1 & R=$!
  sleep 0.3
  $BIN/lightrelay-subscribe --listen 127.0.0.1:$SP --redis-url redis://127.0.0.1:$RP "${HIST[@]}" 2>$d/sub.err & S=$!
  $BIN/lightrelay-publish --listen 127.0.0.1:$PP --redis-url redis://127.0.0.1:$RP "${HIST[@]}" 2>$d/pub.err & P=$!
  sleep 0.5
  $BIN/lightrelay sub ws://127.0.0.1:$SP/gap > $d/got.txt 2>/dev/null & C=$!
  sleep 0.5
  (for i in $(seq 1 2000); do echo $i; sleep 0.002; done) | timeout 60 $BIN/lightrelay pub ws://127.0.0.1:$PP/gap 2>$d/pubc.err & W=$!
  sleep 1.5
  kill -9 $R; wait $R 2>/dev/null
  sleep ${OUTAGE:-1}
  redis-server --port $RP --bind 127.0.0.1 --save '' --appendonly no --dir $d >/dev/null 2>&1 & R=$!
  wait $W; rc=$?
  sleep 1
  got=$(sort -un $d/got.txt | wc -l)
  echo "run $run: pub rc=$rc, subscriber got $got of 2000 distinct, missing $((2000-got))"
  kill $C $S $P $R 2>/dev/null; wait $C $S $P $R 2>/dev/null
  if [ -n "${KEEP:-}" ] && [ $got -lt 2000 ]; then echo "--- sub"; cat $d/sub.err | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | tail -15; echo "--- pub"; sed 's/\x1b\[[0-9;]*m//g' $d/pub.err | cut -c1-220 | tail -12; fi
  rm -rf $d
done
