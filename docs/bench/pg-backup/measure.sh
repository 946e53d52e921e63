#!/bin/bash
# Times confab backup/restore on PostgreSQL: a 210k-message store.
set -e
B=$(realpath ${CONFAB_BIN:-target/release/confab}); PG=/usr/lib/postgresql/15/bin; R=${RUN_DIR:-/tmp/confab-pg-backup}; P=19291
rm -rf $R; mkdir -p $R; chown postgres $R
cleanup() { runuser -u postgres -- $PG/pg_ctl -D $R/pg -m immediate stop >/dev/null 2>&1 || true; kill %1 2>/dev/null || true; }
trap cleanup EXIT
runuser -u postgres -- $PG/initdb -D $R/pg -A trust -U postgres >/dev/null
runuser -u postgres -- $PG/pg_ctl -D $R/pg -o "-p $P -k $R -c listen_addresses=127.0.0.1" -l $R/pg.log -w start >/dev/null
U="postgresql://postgres@127.0.0.1:$P"
$B serve --listen 127.0.0.1:19290 --data-dir $R/node --set database_url= > $R/node.log 2>&1 &
for i in $(seq 50); do curl -sf http://127.0.0.1:19290/healthz >/dev/null && break; sleep 0.2; done
$B bench --url http://127.0.0.1:19290 --users 200 --rate 5000 --duration 42 --room-size 5 --quiet > $R/bench.txt 2>&1 || true
kill %1; wait %1 || true
for db in src r1 r2 r3; do runuser -u postgres -- $PG/createdb -h 127.0.0.1 -p $P $db; done
$B migrate --data-dir $R/node --database-url $U/src > $R/migrate.txt 2>&1
echo "messages: $(runuser -u postgres -- $PG/psql -h 127.0.0.1 -p $P -tAc 'select count(*) from messages' src)"
for i in 1 2 3; do
  s=$(date +%s.%N); $B backup --to $R/c$i.cfbk --database-url $U/src > $R/backup$i.json 2>$R/backup$i.err; e=$(date +%s.%N)
  echo "backup $i: $(echo "$e - $s" | bc) s, $(stat -c %s $R/c$i.cfbk) bytes; $(grep -o 'backup written.*' $R/backup$i.err)"
done
$B backup --to $R/embedded.cfbk --data-dir $R/node --set database_url= > /dev/null 2>&1
echo "the node's own backup: $(stat -c %s $R/embedded.cfbk) bytes"
for i in 1 2 3; do
  s=$(date +%s.%N); /usr/bin/time -f "%M KB max RSS, %U user %S sys" $B restore --from $R/c1.cfbk --database-url $U/r$i > $R/restore$i.txt 2>$R/restore$i.err; e=$(date +%s.%N)
  echo "restore into a database $i: $(echo "$e - $s" | bc) s; $(grep -o 'result: .*' $R/restore$i.txt | head -1); $(tail -1 $R/restore$i.err)"
done
for i in 1 2 3; do
  s=$(date +%s.%N); $B restore --from $R/c1.cfbk --data-dir $R/restored$i --set database_url= > /dev/null 2>$R/rn$i.err; e=$(date +%s.%N)
  echo "restore into a data dir $i: $(echo "$e - $s" | bc) s; $(grep -o 'ledger verified.*' $R/rn$i.err)"
done
uptime
