#!/bin/bash
# On the device: every frozen-BN case, with this stop's src and with the fold of the stop
# before (scale * 0), 12 processes at a time, beside tests/test_frozen_bn.py when PYTEST is set
# (call 1 ran it: pytest-call1.txt).
here=$(dirname "$0")
old=$(mktemp -d); cp -r src "$old/"
sed -i 's/bias = scale \* 0\.0 if conv_bias/bias = scale * 0 if conv_bias/' "$old/src/inductor_convbn/_fold.py"
grep -c "scale \* 0 if" "$old/src/inductor_convbn/_fold.py"
[ -n "$PYTEST" ] && PYTHONPATH=$PWD/src timeout 300 python3 -m pytest -q -p no:logging tests/test_frozen_bn.py > $OUT/pytest.txt 2>&1 &
for src in new old; do
  path=$PWD/src; [ $src = old ] && path=$old/src
  for case in small fpn; do for dtype in float32 bfloat16 float16; do for mode in grad freezing always; do
    log=$OUT/$src-$case-$dtype-$mode.txt
    ( PYTHONPATH=$path TORCHINDUCTOR_CACHE_DIR=$old/cache-$src-$case-$dtype-$mode timeout 300 \
        python3 $here/frozen_bn.py $case $dtype $mode > $log.out 2> $log.err
      echo "rc=$?" >> $log.out ) &
    while [ $(jobs -r | wc -l) -ge 12 ]; do sleep 1; done
  done; done; done
done
wait
python3 $here/table.py $OUT > $OUT/table.txt
cat $OUT/table.txt
for f in $OUT/*.txt.err; do echo "== $(basename $f)"; grep -v "^W1" $f | tail -n 12; done > $OUT/errors.txt
cat $OUT/*.txt.out > $OUT/cases.jsonl; rm $OUT/*.txt.out $OUT/*.txt.err
wait
[ -n "$PYTEST" ] && tail -n 5 $OUT/pytest.txt
true
