# bitsandbytes on the GPU machine, which reaches no package registry and lacks it. Source it from the repo root:
#
#     source benchmarks/device/setup_bnb.sh
#
# carry: .carry/bnb-wheels, made here once with
#     pip download bitsandbytes==0.50.2 --no-deps --python-version 3.12 --platform manylinux_2_24_x86_64 \
#         --only-binary=:all: -d .carry/bnb-wheels
# (its dependencies, torch, numpy and packaging, are on the machine). It installs the wheel into BNB_SITE
# and puts that and the repo root on PYTHONPATH, so `python -m benchmarks.qlora` finds both.

BNB_REPO=${BNB_REPO:-$PWD}
export BNB_SITE=${BNB_SITE:-/tmp/site}
if [ ! -f "$BNB_SITE/bitsandbytes/__init__.py" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$BNB_SITE" \
        "$BNB_REPO"/.carry/bnb-wheels/*.whl || { echo "setup_bnb: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
export PYTHONPATH=$BNB_SITE:$BNB_REPO${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import bitsandbytes, torch; print('setup_bnb: bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__)"
