#!/usr/bin/env bash
# docs/deploy.md, command by command (issue 16 done-when 2), as four parties would: the AI developer (CA and
# aggregator) in dev/, and three hospitals, each in its own folder with its own copy of the
# shared workspace. The aggregator is interrupted once with Ctrl-C (SIGINT to its process
# group, as a terminal sends it) and started again with the same command.
set -um  # job control: background jobs keep SIGINT, as in a terminal
# SRC: the fedloom source to run (default: this checkout's); PY: a python with its deps
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
SRC=${SRC:-$REPO/src}
PY=${PY:-$REPO/.venv/bin/python}
fl() { PYTHONPATH=$SRC $PY -m fedloom "$@"; }
export COLUMNS=200 PYTHONUNBUFFERED=1
ROOT=${ROOT:-/tmp/walk}; rm -rf $ROOT; mkdir -p $ROOT/dev; cd $ROOT
PORT=${PORT:-7455}
SITES="st-marys city-general north-clinic"
say() { echo; echo "##### $*"; }

say "1. AI developer: workspace and CA"
cd $ROOT/dev
fl init fed --template breast-cancer
sed -i 's/^sites:.*$//' fed/federation.yaml
printf 'sites: [st-marys, city-general, north-clinic]\n' >> fed/federation.yaml
sed -i 's/^rounds:.*/rounds: 200/' fed/federation.yaml; grep -q '^rounds:' fed/federation.yaml || echo 'rounds: 200' >> fed/federation.yaml
sed -i "s/^  epochs: 1/  epochs: 20/" fed/federation.yaml
cat fed/federation.yaml
fl plan show fed | tail -3
fl pki init fed --host localhost

say "2. share the workspace (federation.yaml and the .py files)"
for s in $SITES; do mkdir -p $ROOT/$s/fed; cp $ROOT/dev/fed/federation.yaml $ROOT/dev/fed/*.py $ROOT/$s/fed/; done
for s in $SITES; do (cd $ROOT/$s && fl plan show fed | grep -i "plan hash"); done

say "3. each data owner: key, signing request, policy"
for s in $SITES; do (cd $ROOT/$s && fl pki request --name $s fed && fl policy init fed --name $s | tail -4); done

say "4. the CA signs"
for s in $SITES; do cp $ROOT/$s/fed/sites/$s/$s.csr $ROOT/dev/; (cd $ROOT/dev && fl pki sign fed $s.csr --out outbox/$s.crt | head -3); done

say "5. each data owner installs its certificate"
for s in $SITES; do cp $ROOT/dev/outbox/$s.crt $ROOT/dev/fed/pki/ca.crt $ROOT/$s/; (cd $ROOT/$s && fl pki accept --name $s --cert $s.crt --ca ca.crt fed | head -2); done

say "6. each data owner prepares its data"
cd $ROOT
PYTHONPATH=$SRC $PY - <<'PY'
import numpy as np
from sklearn.datasets import load_breast_cancer
x, y = load_breast_cancer(return_X_y=True)
x = (x - x.mean(0)) / x.std(0)
for i, s in enumerate(["st-marys", "city-general", "north-clinic"]):
    np.savez(f"{s}/{s}.npz", x=x[i::3].astype("float32"), y=y[i::3].astype("int64"))
PY

say "8. the AI developer starts the aggregator"
cd $ROOT/dev
start_aggregator() {  # its own process group (set -m), whose leader is the aggregator
  PYTHONPATH=$SRC $PY -m fedloom aggregator start fed --port $PORT > $ROOT/$1 2>&1 &
  AGG=$!
}
start_aggregator agg1.out
say "9. each data owner starts its collaborator"
declare -A PID
for s in $SITES; do
  (cd $ROOT/$s && PYTHONPATH=$SRC exec $PY -m fedloom collaborator start fed --name $s --aggregator localhost:$PORT --data $s.npz) > $ROOT/$s.out 2>&1 &
  PID[$s]=$!
done
for i in $(seq 600); do grep -aq "round 3: update accepted" $ROOT/st-marys.out && break; sleep 0.1; done; echo "seen after $i polls"; grep -ac "update accepted" $ROOT/st-marys.out
say "Ctrl-C on the aggregator (after st-marys saw round 3 accepted)"
kill -INT -- -$AGG; wait $AGG; echo "aggregator exit code $?"
cat $ROOT/agg1.out | tail -8
sleep 8
say "sites while the aggregator is down (still running?)"
for s in $SITES; do kill -0 ${PID[$s]} 2>/dev/null && echo "$s: running" || echo "$s: EXITED"; done
say "8 again. the same command"
start_aggregator agg2.out
timeout 300 tail --pid=$AGG -f /dev/null; wait $AGG; echo "aggregator exit code $?"
for s in $SITES; do wait ${PID[$s]}; echo "$s exit code $?"; done
say "aggregator output, second start"; cat $ROOT/agg2.out
for s in $SITES; do say "$s's screen"; cat $ROOT/$s.out; done
say "each site's kept final model"
for s in $SITES; do (cd $ROOT/$s && ls fed/sites/$s/final/ && fl audit model fed/sites/$s/final/*.safetensors | tail -3; sha256sum fed/sites/$s/final/*.safetensors); done
sha256sum $ROOT/dev/fed/runs/*/final.safetensors
(cd $ROOT/dev && fl status fed | head -12)
