#!/bin/bash
# Device-side smoke of the DeepSpeed baselines (issue 6): set up DeepSpeed from carried files, build its ops,
# keep the built ops for later calls, time the aio settings, then run each baseline mode for 2 steps.
#   carry: .carry/ds-wheels .carry/libaio [.carry/ds-ext]     logs: $OUT
#   SMOKE_PRESET (gpt3-350m), SMOKE_MODES ("zero-infinity zero-offload"), SMOKE_BATCH (4), SMOKE_STEPS (2),
#   SMOKE_S (75, seconds per mode), NVME (/root/ds-smoke)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NVME=${NVME:-/root/ds-smoke}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 --version; df -h /root /tmp | tail -2
  ulimit -l; ls /proc/self/io /proc/diskstats 2>&1
} 2>&1 | tee "$OUT/env.log"
start=$(date +%s)
# Sourced, not piped: a pipeline would run it in a subshell and lose its exports.
source benchmarks/device/setup_deepspeed.sh --build > "$OUT/setup.log" 2>&1
grep -v WARNING "$OUT/setup.log" | tail -20
echo "setup + build: $(( $(date +%s) - start )) s" | tee -a "$OUT/setup.log"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
{
  # Keep the built ops for later calls, debug info stripped (a quarter of the size). Each object keeps its
  # mtime (touch -r): a newer object than ninja's log records makes the next call rebuild everything.
  for f in $(find "$TORCH_EXTENSIONS_DIR" -name '*.o'); do
    cp -p "$f" "$f.mtime" && strip --strip-debug "$f" && touch -r "$f.mtime" "$f"; rm -f "$f.mtime"
  done
  tar -czf "$OUT/ds-ext.tar.gz" --exclude=.restored --exclude=lock -C "$TORCH_EXTENSIONS_DIR" . && ls -la "$OUT/ds-ext.tar.gz"
}
for mode in ${SMOKE_MODES:-zero-infinity zero-offload}; do
  start=$(date +%s)
  timeout ${SMOKE_S:-75} python3 -m benchmarks.deepspeed_baseline --mode "$mode" --preset ${SMOKE_PRESET:-gpt3-350m} \
    --batch-size ${SMOKE_BATCH:-4} --seq-len 2048 --steps ${SMOKE_STEPS:-2} --nvme-dir "$NVME/$mode" --json-out "$OUT/smoke-$mode.json" \
    > "$OUT/smoke-$mode.log" 2>&1
  echo "$mode: exit $? in $(( $(date +%s) - start )) s"; grep -E "^step|Error|error" "$OUT/smoke-$mode.log" | tail -8
  rm -rf "$NVME/$mode"
done
timeout 45 python3 -m benchmarks.deepspeed_baseline --aio-sweep --nvme-dir "$NVME" --aio-sweep-bytes $((512 << 20)) \
  --json-out "$OUT/aio-sweep.json" 2>&1 | grep -v WARNING | tee "$OUT/aio-sweep.log"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("smoke-*.json")):
    r = json.loads(path.read_text())
    keep = ("system", "fits", "init_s", "mean_step_s", "model_tflops", "peak_vram_allocated_bytes", "peak_rss_bytes",
            "ssd_read_bytes_per_step", "ssd_write_bytes_per_step", "swap_files", "total_disk")
    print(json.dumps({k: r.get(k) for k in keep}))
    print("  steps:", [(s["step_s"], s["loss"], s["io"].get("read_bytes"), s["io"].get("write_bytes"), s.get("disk")) for s in r.get("steps", [])])
    print("  init_s", r.get("init_s"), "init_io", r.get("init_io"), "total_io", r.get("total_io"))
PY
