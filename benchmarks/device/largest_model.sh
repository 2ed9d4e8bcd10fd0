#!/usr/bin/env bash
# Issue 4's largest-model run on the GPU machine, from the repository root (or a copy of it):
#   FUYOU_COMMIT=<commit> OUT=<dir> bash benchmarks/device/largest_model.sh
# Prints the machine's RAM, disk and GPU, asks fuyou.runtime.memory_need which splits of the 10.3B
# model's optimizer state fit (offload.optimizer_cpu_blocks), takes three blocks fewer than the most for
# margin, and runs the fuyou-10b-split case with it (stopped by SIGINT at LIMIT_S, default 555 s, so a
# slow machine still writes the steps done), with RAM, disk and GPU memory logged every 20 s.
set -o pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
date -u; nproc; free -g; df -h /root; nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
K=$(python - <<'PY' | tail -1
import psutil, shutil, sys
from fuyou.models import build_model, get_preset
from fuyou.runtime import PROCESS_RESERVE_BYTES, Placement, memory_need
m = build_model(get_preset("gpt3-13b").replace(num_layers=32), device="meta")
ram, disk = psutil.virtual_memory().available - PROCESS_RESERVE_BYTES, shutil.disk_usage("/root").free
fit = [k for k in range(33) if (n := memory_need(m, Placement("cpu", "ssd", "none", k), gradient_ring=2)).cpu_bytes <= ram and n.ssd_bytes <= disk]
print(f"available beside the reserve: RAM {ram/1e9:.1f} GB, disk {disk/1e9:.1f} GB; optimizer_cpu_blocks that fit: {fit}", file=sys.stderr)
print(max(min(fit), max(fit) - 3) if fit else 18)  # three blocks (11 GB) short of the most that fits: margin for what memory_need leaves out
PY
)
echo "optimizer_cpu_blocks=$K"
(while sleep 20; do echo "$(date -u +%T) $(free -g | awk '/Mem/{print "used",$3,"avail",$7}') $(df -BG /root | awk 'NR==2{print "disk used",$3}') $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"; done) &
MON=$!
timeout -s INT "${LIMIT_S:-555}" python -m benchmarks.run --case fuyou-10b-split --set offload.optimizer_cpu_blocks=$K --json-out "$OUT/fuyou-10b-split.json"
RC=$?
kill $MON
echo "rc=$RC"; date -u; ls -la /root/swap 2>/dev/null
exit $RC
