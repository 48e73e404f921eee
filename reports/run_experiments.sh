#!/usr/bin/env bash
# The experiments behind reports/README.md, exactly as run (issues 13 and 12). Every command is resumable:
# each is run in chunks of at most 19 minutes (`timeout`) and started again until it exits 0, picking
# up the units it has checkpointed under reports/<model>/<experiment>/units/ (not committed).
# Single-threaded and niced: the machine is shared.  Usage: bash reports/run_experiments.sh a|b|c|d
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ALL="black grey mean blur noise smooth-grey layer layer-renorm layer-zero inpaint-telea inpaint-ns segment-mean noisy-linear"
patch() { [ "$1" = efficientnet-lite2 ] && echo 20 || echo 16; }   # 260 px: 20 px patches (13 x 13)

run() {  # run ARGS...: repeat in chunks until it finishes
  for attempt in $(seq 1 30); do
    timeout 1140 nice -n 10 python -m masked_ops.experiments "$@" --seed 0 --threads "${THREADS:-1}" --channels-last \
      --batch-size 16 --no-progress && return 0
    echo "chunk $attempt of: $* ended (status $?), resuming" >&2
  done
  return 1
}

removal() { run removal --model "$1" --out "reports/$1" --images bundled --augment 1 --repeats 3 \
  --patch "$(patch "$1")" --strategies $ALL; }
probe() { run leakage-probe --model "$1" --out "reports/$1" --images bundled --probe-augment 1 --strategies $ALL; }
salient() { run leakage-salient --model "$1" --out "reports/$1" --images bundled --augment 1 --strategies $ALL; }
faith() { run faithfulness --model "$1" --out "reports/$1" --images bundled --samples 100 --steps 6 \
  --strategies grey layer noisy-linear --evaluators grey layer inpaint-telea noisy-linear segment-mean; }

# Learned masks (issue 12): DiffMask trained on the other bundled photos, everything scored on three
# held-out photos, by removal under grey, blur and layer masking (the experiment's EVALUATORS).
# Run with 2 threads (THREADS=2) once the other chains had finished.
learned() { THREADS=2 run learned-faithfulness --model "$1" --out "reports/$1" --images chelsea coffee astronaut \
  --samples 500; }

case "${1:-}" in
  a) removal efficientnet-lite0 && faith efficientnet-lite0 && probe efficientnet-lite0 && salient efficientnet-lite0 ;;
  b) removal efficientnet-lite1 && probe efficientnet-lite1 && salient efficientnet-lite1 && faith efficientnet-lite1 ;;
  c) removal efficientnet-lite2 && probe efficientnet-lite2 && salient efficientnet-lite2 && faith efficientnet-lite2 ;;
  d) learned efficientnet-lite0 ;;
  *) echo "usage: $0 a|b|c|d (chains that can run side by side)" >&2; exit 2 ;;
esac
