#!/usr/bin/env bash
# The main job on the embedded default: export SmolLM2-135M-Instruct with LoRA, fine-tune it briefly on the
# bundled Shakespeare excerpt, print the held-out loss before and after, and write a PEFT adapter.
set -euo pipefail
BUNDLE=${BUNDLE:-out/smollm2-lora}
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-30}

# (Re-)export unless a bundle of this lars' format is there already.
if ! python -c "import json, sys, lars_artifacts as a; sys.exit(json.load(open('$BUNDLE/manifest.json'))
                ['format_version'] != a.FORMAT_VERSION)" 2>/dev/null; then
  lars-export --out "$BUNDLE" --force
fi
if [ -n "${EXPORT_ONLY:-}" ]; then exit 0; fi  # make federated-demo: the bundle only
rm -rf "$RUN"
echo "== held-out loss before fine-tuning"
lars-ort eval "$BUNDLE" --data tests/data/macbeth_act1_eval.txt --seq-len 256
echo "== fine-tuning $STEPS steps (batch 4 x 256 tokens)"
lars-ort train "$BUNDLE" --data tests/data/hamlet_act1.txt --eval-data tests/data/macbeth_act1_eval.txt \
  --out "$RUN" --steps "$STEPS" --batch-size 4 --seq-len 256 --lr 1e-3 --warmup-steps 3 --save-every 10
echo "== held-out loss after fine-tuning"
lars-ort eval "$BUNDLE" --data tests/data/macbeth_act1_eval.txt --seq-len 256 --run "$RUN"
lars-ort export-adapter "$RUN" --out "$RUN/adapter"
echo "metrics: $RUN/metrics.jsonl; PEFT adapter: $RUN/adapter"
