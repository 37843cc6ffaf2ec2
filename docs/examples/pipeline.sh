#!/usr/bin/env bash
# Gate one upload in a shell pipeline: accept, reject, or hold it.
#
#   MODELHASH_REGISTRY=https://registry.example MODELHASH_API_KEY=mh_... \
#     ./pipeline.sh incoming/model.safetensors
#
# Exit codes of `modelhash check`: 0 clean, 1 flagged, 2 not a weight file that can
# be read safely, 3 the registry could not answer. Choose what 3 means for you:
# HOLD (fail-closed, the default here) or ACCEPT and queue a re-check (fail-open).
set -u
upload="$1"
on_registry_down="${ON_REGISTRY_DOWN:-hold}"   # or: accept

report="$(modelhash check --json -- "$upload")"
case $? in
  0) echo "accept $upload" ;;
  1) echo "reject $upload: flagged"; echo "$report" >> flagged-uploads.jsonl; exit 1 ;;
  2) echo "reject $upload: unreadable or hostile file"; exit 1 ;;
  3) if [ "$on_registry_down" = accept ]; then
       echo "accept $upload (unchecked: queued for a re-check)"
       echo "$upload" >> recheck-queue.txt
     else
       echo "hold $upload: the registry did not answer; retry later"; exit 75
     fi ;;
esac
