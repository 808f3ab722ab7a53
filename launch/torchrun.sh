#!/usr/bin/env bash
# Launch train.py on one or more nodes with torchrun, after checking the config in one process.
#
#   one node:        launch/torchrun.sh --nproc 4 -- parallel=tp2 parallel.zero_stage=1 data.manifest=...
#   node i of N:     launch/torchrun.sh --nproc 8 --nnodes N --node-rank i --rdzv-endpoint HOST:29500 \
#                        [--rdzv-id JOB] -- +experiment=llama1_7b parallel=tp8 parallel.zero_stage=1
#
# Everything after `--` goes to train.py as Hydra overrides. Before any worker is spawned,
# `python -m llama_pt.train.check --world-size nproc*nnodes` validates the config for that world
# (fields, parallel layout, batch split, data): a bad config fails here in one line, exit status 2.
# Several nodes rendezvous with torch's c10d backend at --rdzv-endpoint; the node with --node-rank 0
# hosts the rendezvous store there (global ranks are assigned by the rendezvous, TP groups are
# consecutive ranks, so each node's processes form whole TP groups when nproc is a multiple of t;
# pipeline stages are the outermost ranks, e.g. parallel=pp2 on 2 nodes puts one stage on each).
# Checkpoints must go to a folder every node sees. PYTHON selects the interpreter (default: the
# repository's .venv if present, else python3).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
NPROC=1 NNODES=1 NODE_RANK=0 ENDPOINT="" RDZV_ID="llama_pt"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) NPROC="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --rdzv-endpoint) ENDPOINT="$2"; shift 2 ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (Hydra overrides go after --)" >&2; exit 2 ;;
  esac
done
for v in NPROC NNODES NODE_RANK; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "error: --$(echo "$v" | tr 'A-Z_' 'a-z-')=${!v} must be a non-negative integer" >&2; exit 2; }
done
if (( NPROC < 1 || NNODES < 1 || NODE_RANK >= NNODES )); then
  echo "error: need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes" >&2; exit 2
fi
if (( NNODES > 1 )) && [[ -z "$ENDPOINT" ]]; then
  echo "error: --nnodes=$NNODES needs --rdzv-endpoint HOST:PORT" >&2; exit 2
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m llama_pt.train.check --world-size $(( NPROC * NNODES )) "$@"

if [[ -z "$ENDPOINT" ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" "$REPO/train.py" "$@"
fi
IS_HOST=false; (( NODE_RANK == 0 )) && IS_HOST=true
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="$RDZV_ID" --rdzv-conf="is_host=$IS_HOST" \
  "$REPO/train.py" "$@"
