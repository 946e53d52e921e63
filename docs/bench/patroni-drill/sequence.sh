#!/bin/sh
# The sequence of runs used for the measurements (see README.md).
# usage: sequence.sh PREFIX KIND... ; each run is followed by `restore`.
set -e
cd "$(dirname "$0")"
prefix=$1; shift
i=0
for kind in "$@"; do
  i=$((i+1))
  /usr/bin/python3 drill.py run "$kind" "$prefix-$kind-$i"
  /usr/bin/python3 drill.py restore
done
