#!/usr/bin/env bash
# The final weights of fixed federations, as sha256 lines: run before and after a change
# that must not alter behaviour (issue 17) and compare. Every run here is deterministic on
# CPU: the same source gives the same lines.
#   demo         `make demo`'s federation (digits, 8 sites, dirichlet:0.3, fedavg)
#   fedadam      breast-cancer, fedadam (DP noise is drawn from the OS's secret
#                randomness, so a DP run has no fingerprint)
#   secagg       breast-cancer, secure aggregation
#   attack-*     breast-cancer with a simulated attack (--attack sign-flip, label-flip)
#   grpc-*       breast-cancer over gRPC with mutual TLS: an aggregator and three
#                collaborators as OS processes on loopback; the aggregator's model and
#                each site's kept final model
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
SRC=${SRC:-$REPO/src}
PY=${PY:-$REPO/.venv/bin/python}
fl() { PYTHONPATH=$SRC $PY -m fedloom "$@"; }
export COLUMNS=200 PYTHONUNBUFFERED=1
ROOT=$(mktemp -d); trap 'rm -rf "$ROOT"' EXIT; cd "$ROOT"
PORT=${PORT:-7465}
# the tensors' names, dtypes, shapes and bytes (a site's kept model also carries its own
# signature metadata, which differs between runs)
hash() {
  PYTHONPATH=$SRC $PY -c '
import hashlib, sys
from safetensors.numpy import load_file
h = hashlib.sha256()
for name, a in sorted(load_file(sys.argv[2]).items()):
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode()); h.update(a.tobytes())
print(sys.argv[1], h.hexdigest())' "$1" "$2"
}

fl init demo --template digits > /dev/null
fl simulate demo --sites 8 --partition dirichlet:0.3 --strategy fedavg --run-name r > demo.out 2>&1
hash demo demo/runs/r/final.safetensors

fl init bc --template breast-cancer > /dev/null
sed -i 's/^rounds:.*/rounds: 6/' bc/federation.yaml
cp -r bc fa; cp -r bc sa
fl simulate fa --strategy fedadam --run-name r > fa.out 2>&1 || { cat fa.out; exit 1; }
hash fedadam fa/runs/r/final.safetensors
cat >> sa/federation.yaml <<'YAML'
privacy:
  secure_aggregation: true
YAML
fl simulate sa --run-name r > sa.out 2>&1 || { cat sa.out; exit 1; }
hash secagg sa/runs/r/final.safetensors
# simulated attacks: 2 of 3 sites send minus their update (median), or train on flipped
# labels (fedavg)
cp -r bc sf; cp -r bc lf
fl simulate sf --strategy median --attack sign-flip --attackers 1 --run-name r > sf.out 2>&1 \
  || { cat sf.out; exit 1; }
hash attack-sign-flip sf/runs/r/final.safetensors
fl simulate lf --attack label-flip --attackers 2 --run-name r > lf.out 2>&1 \
  || { cat lf.out; exit 1; }
hash attack-label-flip lf/runs/r/final.safetensors

SITES="st-marys city-general north-clinic"
mkdir dev; cp -r bc dev/fed; cd dev
sed -i 's/^sites:.*$//' fed/federation.yaml
printf 'sites: [st-marys, city-general, north-clinic]\n' >> fed/federation.yaml
fl pki init fed --host localhost > /dev/null
for s in $SITES; do
  mkdir -p ../$s/fed; cp fed/federation.yaml fed/*.py ../$s/fed/
  (cd ../$s && fl pki request --name $s fed > /dev/null && fl policy init fed --name $s > /dev/null)
  cp ../$s/fed/sites/$s/$s.csr .; fl pki sign fed $s.csr --out outbox/$s.crt > /dev/null
  cp outbox/$s.crt fed/pki/ca.crt ../$s/
  (cd ../$s && fl pki accept --name $s --cert $s.crt --ca ca.crt fed > /dev/null)
done
cd "$ROOT"
PYTHONPATH=$SRC $PY - <<'PY'
import numpy as np
from sklearn.datasets import load_breast_cancer
x, y = load_breast_cancer(return_X_y=True)
x = (x - x.mean(0)) / x.std(0)
for i, s in enumerate(["st-marys", "city-general", "north-clinic"]):
    np.savez(f"{s}/{s}.npz", x=x[i::3].astype("float32"), y=y[i::3].astype("int64"))
PY
(cd dev && fl aggregator start fed --port $PORT > ../agg.out 2>&1) & AGG=$!
pids=()
for s in $SITES; do
  (cd $s && fl collaborator start fed --name $s --aggregator localhost:$PORT --data $s.npz > ../$s.out 2>&1) &
  pids+=($!)
done
wait $AGG || { cat agg.out; exit 1; }
for p in "${pids[@]}"; do wait "$p"; done
hash grpc-aggregator "$(ls dev/fed/runs/*/final.safetensors)"
for s in $SITES; do hash "grpc-$s" "$(ls $s/fed/sites/$s/final/*.safetensors)"; done
