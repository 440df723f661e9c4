#!/bin/bash
# Validation-split recipe trials (run as two calls of 12 and 8 runs, in parallel on one GPU) on the lent GPU (accuracy only; CPU timings come from /tmp/thr.py on the 2-core CPU).
set -u
# the device had torch 2.11 but not timm/huggingface_hub 2: wheels and data were carried in .devdata/
pip install -q --no-deps --target /tmp/site .devdata/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/data && tar -xJf .devdata/cifar.tar.xz -C /tmp/data
DATA=$(dirname $(find /tmp/data -maxdepth 3 -type d -name train | head -1))
echo "data $DATA"; nvidia-smi --query-gpu=name --format=csv,noheader
W=.devdata/efficientnet-lite0-57934424.pth
common="--backbone efficientnet_lite0 --backbone-weights $W --data-dir $DATA --val-fraction 0.1 --batch-size 128 --optimizer sgd --tta-flip --cache-features --no-variants --no-progress --device cuda --amp off --threads 1"
run() { name=$1; shift; python -m cifar_transfer.train $common --output /tmp/trials/$name "$@" > $OUT/$name.log 2>&1; cp /tmp/trials/$name/metrics.json $OUT/$name.metrics.json 2>/dev/null; echo "done $name $(tail -2 $OUT/$name.log | head -1)"; }
while read name args; do run $name --label-smoothing 0.1 $args & done <<LIST
T01 --input-size 128 --freeze-stages 5 --cache-views 2 --epochs 2 --lr 0.05
T02 --input-size 128 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.05
T03 --input-size 160 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.05
T04 --input-size 160 --freeze-stages 7 --cache-views 2 --epochs 6 --lr 0.05
T05 --input-size 192 --freeze-stages 7 --cache-views 2 --epochs 3 --lr 0.05
T06 --input-size 224 --freeze-stages 7 --cache-views 1 --epochs 3 --lr 0.05
T07 --input-size 192 --freeze-stages 7 --cache-views 1 --epochs 5 --lr 0.05
T08 --input-size 128 --freeze-stages 5 --cache-views 3 --epochs 6 --lr 0.05
T09 --input-size 160 --freeze-stages 7 --cache-views 3 --epochs 4 --lr 0.05
T10 --input-size 128 --freeze-stages 7 --cache-views 3 --epochs 8 --lr 0.05
T11 --input-size 160 --freeze-stages 7 --cache-views 2 --epochs 6 --lr 0.1
T12 --input-size 224 --freeze-stages 7 --cache-views 1 --epochs 3 --lr 0.1
T13 --input-size 160 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.1
T14 --input-size 160 --freeze-stages 6 --cache-views 1 --epochs 3 --lr 0.05
T15 --input-size 160 --freeze-stages 6 --cache-views 1 --epochs 3 --lr 0.1
T16 --input-size 160 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.05 --seed 1
T17 --input-size 144 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.1
T18 --input-size 128 --freeze-stages 5 --cache-views 2 --epochs 2 --lr 0.1
T19 --input-size 160 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.05 --batch-size 64
T20 --input-size 160 --freeze-stages 6 --cache-views 2 --epochs 2 --lr 0.05 --label-smoothing 0.0
LIST
wait
grep -h "val acc\|test accuracy" $OUT/*.log | tail -3 >/dev/null
for f in $OUT/*.log; do echo "== $f"; grep -E "^epoch|test accuracy under|cached" $f; done
