#!/bin/bash
# single node; two nodes (cross: one hop); three nodes (two hops: subscribers on A, publisher on B, owner C)
B=/work/main/target/release
pkill -f "fluxnode --listen 127.0.0.1:4100" ; sleep 0.5
$B/fluxnode --listen 127.0.0.1:41000 --shards 1 > n0.log 2>&1 & P0=$!
$B/fluxnode --listen 127.0.0.1:41001 --shards 1 --peer 127.0.0.1:41001 --peer 127.0.0.1:41002 > n1.log 2>&1 & P1=$!
$B/fluxnode --listen 127.0.0.1:41002 --shards 1 --peer 127.0.0.1:41001 --peer 127.0.0.1:41002 > n2.log 2>&1 & P2=$!
$B/fluxnode --listen 127.0.0.1:41003 --shards 1 --peer 127.0.0.1:41003 --peer 127.0.0.1:41004 --peer 127.0.0.1:41005 > n3.log 2>&1 & P3=$!
$B/fluxnode --listen 127.0.0.1:41004 --shards 1 --peer 127.0.0.1:41003 --peer 127.0.0.1:41004 --peer 127.0.0.1:41005 > n4.log 2>&1 & P4=$!
$B/fluxnode --listen 127.0.0.1:41005 --shards 1 --peer 127.0.0.1:41003 --peer 127.0.0.1:41004 --peer 127.0.0.1:41005 > n5.log 2>&1 & P5=$!
for p in 41000 41001 41002 41003 41004 41005; do
  for i in $(seq 1 100); do curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:$p/readyz | grep -q 200 && break; sleep 0.1; done
done
$B/fluxbench fanout --subscribers 100 --rate 10000 --seconds 6 --repeat 2 \
  --target single=rayflux://127.0.0.1:41000,pid=$P0 \
  --target cross=rayflux://127.0.0.1:41001,publish=127.0.0.1:41002,owner=127.0.0.1:41002,pid=$P1+$P2 \
  --target twohop=rayflux://127.0.0.1:41003,publish=127.0.0.1:41004,owner=127.0.0.1:41005,pid=$P3+$P4+$P5 \
  --json-out results.jsonl
kill $P0 $P1 $P2 $P3 $P4 $P5
