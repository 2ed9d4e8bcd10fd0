# DeepSpeed on the GPU machine from carried files only (no registry reaches it). Source it from the repo root:
#
#     source benchmarks/device/setup_deepspeed.sh [--build]
#
# carry: .carry/ds-wheels .carry/libaio [.carry/ds-ext]
#   .carry/ds-wheels  deepspeed 0.19.8 and the dependencies the image lacks, cp312 wheels
#                     (pip download --python-version 3.12 --only-binary=:all: ...; see ../shared/DEPENDENCIES.md)
#   .carry/libaio     libaio 0.3.113 from Debian bookworm (`apt-get download libaio1 libaio-dev`, unpacked):
#                     include/libaio.h, lib/libaio.so{,.1,.1.0.2} (real copies, not links), the .debs and COPYRIGHT
#   .carry/ds-ext     optional: ds-ext.tar.gz, the JIT-built ops (async_io, pin_memory, cpu_adam) from an
#                     earlier call; restored into TORCH_EXTENSIONS_DIR so that ninja finds them up to date
#
# It installs the wheels into DS_SITE (pip --no-index --no-deps --target), points the compiler and the
# loader at the carried libaio (CPATH/LIBRARY_PATH for DeepSpeed's JIT build of async_io, CFLAGS/LDFLAGS
# for its `has_function('io_submit')` compatibility check, LD_LIBRARY_PATH for loading libaio.so.1),
# and sets TORCH_EXTENSIONS_DIR. With --build it also builds the three ops now (in parallel) and prints
# each build's seconds and AsyncIOBuilder().is_compatible().

DS_REPO=${DS_REPO:-$PWD}
export DS_SITE=${DS_SITE:-/tmp/ds-site}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ds-ext}
DS_LIBAIO=$DS_REPO/.carry/libaio

if [ ! -f "$DS_SITE/deepspeed/__init__.py" ]; then
    ds_start=$(date +%s)
    # The image's own copies of these win nothing; the target directory is ahead on PYTHONPATH.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DS_SITE" \
        "$DS_REPO"/.carry/ds-wheels/*.whl || { echo "setup_deepspeed: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
    echo "setup_deepspeed: wheels installed into $DS_SITE in $(( $(date +%s) - ds_start )) s"
fi
export PYTHONPATH=$DS_SITE:$DS_REPO${PYTHONPATH:+:$PYTHONPATH}
export PATH=$DS_SITE/bin:$PATH
export CPATH=$DS_LIBAIO/include${CPATH:+:$CPATH}
export LIBRARY_PATH=$DS_LIBAIO/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$DS_LIBAIO/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CFLAGS="-I$DS_LIBAIO/include${CFLAGS:+ $CFLAGS}"
export LDFLAGS="-L$DS_LIBAIO/lib${LDFLAGS:+ $LDFLAGS}"
# The image sets TORCH_CUDA_ARCH_LIST with an arch-specific suffix ("9.0a"), which DeepSpeed 0.19.8's JIT
# builder cannot parse (int("0a")); the ops it builds here have no kernels that need the suffix.
if [ -n "$TORCH_CUDA_ARCH_LIST" ]; then
    export TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9])[a-z]+/\1/g')
fi
# The GPU machine's NCCL must keep NVLink multicast off (KINDS.md); a single GPU needs none of it anyway.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$TORCH_EXTENSIONS_DIR"

if [ -f "$DS_REPO/.carry/ds-ext/ds-ext.tar.gz" ] && [ ! -e "$TORCH_EXTENSIONS_DIR/.restored" ]; then
    tar -xzf "$DS_REPO/.carry/ds-ext/ds-ext.tar.gz" -C "$TORCH_EXTENSIONS_DIR" && touch "$TORCH_EXTENSIONS_DIR/.restored"
    # pip stamps the sources it installs with the current time; ninja would then rebuild every object.
    # Back-date them below the carried objects' times so that the restored build is up to date.
    find "$DS_SITE/deepspeed/ops/csrc" -type f -exec touch -d 2000-01-01 {} +
    echo "setup_deepspeed: restored JIT ops into $TORCH_EXTENSIONS_DIR"
fi

if [ "$1" = "--build" ]; then
    ds_build() {
        python3 - "$1" <<'EOF'
import sys, time
from deepspeed.ops import op_builder
name = sys.argv[1]
builder = getattr(op_builder, name)()
start_s = time.perf_counter()
compatible = builder.is_compatible(verbose=True)
builder.load(verbose=False)
print(f"setup_deepspeed: {name} is_compatible={compatible} load/build {time.perf_counter() - start_s:.1f} s", flush=True)
EOF
    }
    # pin_memory first on its own: async_io loads it too, and two JIT builds of one op would race.
    ds_build PinMemoryBuilder
    ds_build AsyncIOBuilder & ds_pid_aio=$!
    ds_build CPUAdamBuilder & ds_pid_adam=$!
    wait $ds_pid_aio; ds_rc_aio=$?
    wait $ds_pid_adam; ds_rc_adam=$?
    echo "setup_deepspeed: build exit codes async_io=$ds_rc_aio cpu_adam=$ds_rc_adam"
fi
