#!/usr/bin/env bash
# The classic adding-problem result (docs/experiments.md): LSTM vs tanh RNN at T = 100.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs
for m in lstm rnn; do
  /usr/bin/time -f "$m: %e s" rnnc run specs/adding_$m.rnn --train --task adding \
    --seq-len 100 --steps 3000 --seed 0 --quiet --log docs/adding_$m.jsonl
done
python bench/plot_logs.py docs/adding.png docs/adding_lstm.jsonl docs/adding_rnn.jsonl
