"""`fuyou probe`: measure this machine into a `HardwareProfile`.

What it measures (the fastest of a few timed calls after a warm-up for a resource alone, the median of
more calls for one shared with the runtime's other work; `quick` shrinks every size so CI runs it in
seconds, at the price of rates well below the hardware's):
    compute    CUDA: bf16 GEMM n^3 (n = 8192; quick 1024) and FP8 e4m3 `torch._scaled_mm` where the GPU
               has FP8 (compute capability >= 8.9), else 0 with the reason in `source`.
               CPU only: an fp32 matmul, written as `gpu_tflops` with `compute_device: cpu`.
    PCIe       CUDA: pinned H2D and D2H copies of 1 GiB (quick 64 MiB), each alone and both at once on two
               streams (`pcie_duplex_gbps`). CPU only: a host memory copy, the runtime's "transfer" there.
    block      CUDA: one GPT-style transformer block (D 2560, 32 heads, F 4D: the GPT-3 2.7B block) forward
               + backward under bf16 autocast on an fp32 residual stream, batch 8 x 2048 (quick 1 x 256), as
               the runtime runs it; hardware FLOPs / time / gpu_tflops -> `block_efficiency`. Shape-
               dependent (larger D runs nearer the GEMM rate): the cost model applies it to every shape.
    CPU AdamW  torch's fused CPU AdamW (foreach where fused is missing) over 256M fp32 params (quick 2M).
    CPU pass   a copy of 1 GiB (quick 64 MiB) between fp32 tensors, bytes read + written per second ->
               `cpu_memory_gbps`, the rate of the optimizer worker's casts and gradient adds.
    CPU under load (CUDA only) both again the way the runtime's optimizer worker meets them: the
               runtime's AdamW kernel (offload.cpu_optimizer.AdamWKernel) on [3, n] states in pinned
               pool buffers, 4 groups of 64M params (quick 4 x 1M), and the cast pass from fp32 masters
               into bf16 weights, while a load thread launches the block workload above (forward +
               backward, from Python, as the runtime's main thread does) and pinned 256 MiB copies
               H2D and D2H on their own streams, waited on with blocking-sync events as
               offload.streams does -> `cpu_adam_loaded_gparams_per_s`,
               `cpu_memory_loaded_gbps`. DMA and AdamW share the DRAM (AdamW moves ~28 B/param), and
               the copies' threads share the cores with torch's intra-op threads. AdamW once more with
               a clip factor (0.5), as a clipped step's updates run it -> `cpu_adam_clipped_loaded_gparams_per_s`.
    SSD        O_DIRECT writes then reads of a 4 GiB file (quick 32 MiB) under `ssd_dir` through
               offload's `PosixBackend` (the store's own I/O path: 8 MiB pieces, 8 threads); then the
               optimizer's pattern, one 512 MiB group read ahead while another is written behind, over
               that file and a second one -> `ssd_duplex_gbps` (bytes read + written per second; see
               `ssd_gbps`). The directory is
               one "drive" (`ssd_count: 1`): point it at a RAID-0 and the array's rate is what you
               get. Filesystems without O_DIRECT (tmpfs) give buffered, page-cache rates: noted.
    capacity   free GPU memory, available RAM, free disk under `ssd_dir`, in GiB.
Not measured: the GPU's rate while copies run, SSD DMA beside the optimizer (the cost model leaves
them out too).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from fuyou.errors import FuyouError
from fuyou.plan.hardware import HardwareProfile

GiB = 1 << 30
MiB = 1 << 20


def _samples(fn, repeats: int, synchronize) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    synchronize()
    samples = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        fn()
        synchronize()
        samples.append(time.perf_counter() - start_s)
    return samples


def _timed(fn, repeats: int, synchronize=lambda: None) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`, after one warm-up call: for a resource alone,
    the best run is the machine's rate, slower ones measure whatever else shared it at the time."""
    return min(_samples(fn, repeats, synchronize))


def _median_timed(fn, repeats: int, synchronize=lambda: None) -> float:
    """Seconds of the median of `repeats` calls of `fn`, after one warm-up call: for rates under shared
    load, which the runtime meets at their typical value, not at their best. On the H100 machine 40
    samples of AdamW under the probe's load spread from 1.2 to 4.4 Gparam/s (median 2.8); the best of
    the first three, 3.5, was what the probe used to take, and the runs of planner check 1 met 2.7-3.3
    (RESULTS.md, issue 5; `benchmarks.diag.rate_drift`)."""
    return statistics.median(_samples(fn, repeats, synchronize))


def gemm_tflops(n: int, device: str, dtype: torch.dtype, repeats: int) -> float:
    """2 n^3 FLOPs per n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2 * n**3 / _timed(lambda: a @ b, repeats, sync) / 1e12


def fp8_tflops(n: int, repeats: int) -> tuple[float, str]:
    """FP8 e4m3 GEMM through `torch._scaled_mm`, or (0, why not)."""
    if torch.cuda.get_device_capability() < (8, 9):
        return 0.0, f"no FP8 tensor cores (compute capability {torch.cuda.get_device_capability()})"
    try:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm wants b column-major
        one = torch.ones((), device="cuda")
        seconds = _timed(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                         repeats, torch.cuda.synchronize)
        return 2 * n**3 / seconds / 1e12, "measured"
    except (RuntimeError, AttributeError) as error:
        return 0.0, f"torch._scaled_mm failed ({str(error).splitlines()[0][:80]})"


def pcie_gbps(num_bytes: int, repeats: int) -> tuple[float, float, float]:
    """(H2D, D2H, both at once summed) GB/s with pinned host memory."""
    host_in = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    device_in = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    device_out = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    h2d_stream, d2h_stream = torch.cuda.Stream(), torch.cuda.Stream()
    sync = torch.cuda.synchronize

    def h2d():
        with torch.cuda.stream(h2d_stream):
            device_in.copy_(host_in, non_blocking=True)

    def d2h():
        with torch.cuda.stream(d2h_stream):
            host_out.copy_(device_out, non_blocking=True)

    def both():
        h2d()
        d2h()

    h2d_s, d2h_s, both_s = (_timed(fn, repeats, sync) for fn in (h2d, d2h, both))
    return num_bytes / h2d_s / 1e9, num_bytes / d2h_s / 1e9, 2 * num_bytes / both_s / 1e9


def memcpy_gbps(num_bytes: int, repeats: int) -> float:
    """Host copy rate (bytes copied per second), the CPU-only stand-in for PCIe."""
    src = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return num_bytes / _timed(lambda: dst.copy_(src), repeats) / 1e9


PROBE_BLOCK_PRESET = "gpt3-2.7b"


def block_shape(quick: bool) -> tuple[int, int]:
    """(batch, sequence) of the probe's block workload."""
    return (1, 256) if quick else (8, 2048)


def block_workload(quick: bool):
    """One GPT-3 2.7B block's forward + backward under bf16 autocast on an fp32 input, as the runtime
    runs a block: () -> None, queued on the current stream."""
    from fuyou.models import get_preset
    from fuyou.models.transformer import Block

    config = get_preset(PROBE_BLOCK_PRESET)
    batch, seq = block_shape(quick)
    block = Block(config).cuda()
    x_BSD = torch.randn(batch, seq, config.hidden_size, device="cuda", requires_grad=True)
    grad_BSD = torch.randn_like(x_BSD)

    def forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_BSD = block(x_BSD)
        y_BSD.backward(grad_BSD)

    return forward_backward


def block_efficiency(gpu_tflops: float, quick: bool) -> tuple[float, str]:
    """Achieved fraction of `gpu_tflops` for one transformer block's forward + backward (module docstring)."""
    from fuyou.models import get_preset
    from fuyou.plan.cost_model import block_forward_flops

    batch, seq = block_shape(quick)
    seconds = _timed(block_workload(quick), 3 if quick else 10, torch.cuda.synchronize)
    torch.cuda.empty_cache()  # the workload's tensors were freed with it
    flops = 3 * block_forward_flops(get_preset(PROBE_BLOCK_PRESET), batch, seq).forward  # forward + backward (2 x forward)
    return min(1.0, flops / seconds / 1e12 / gpu_tflops), f"GPT-3 2.7B block, {batch} x {seq}"


def adam_gparams_per_s(num_params: int, repeats: int) -> tuple[float, str]:
    """torch AdamW on CPU fp32 params; fused where this torch has it."""
    param = torch.nn.Parameter(torch.zeros(num_params))
    param.grad = torch.randn(num_params)
    try:
        optimizer, kind = torch.optim.AdamW([param], lr=1e-4, fused=True), "fused"
        optimizer.step()
    except (RuntimeError, TypeError):
        optimizer, kind = torch.optim.AdamW([param], lr=1e-4, foreach=True), "foreach"
    return num_params / _timed(optimizer.step, repeats) / 1e9, kind


def cpu_rates_under_load(quick: bool, num_groups: int = 4, *, clip: float = 1.0, fold_clip: bool = True,
                         timer=_median_timed) -> tuple[float, float]:
    """(AdamW Gparam/s, cast pass GB/s read + written) on the optimizer worker's data while the GPU and
    PCIe are busy (module docstring), each the median of 15 calls once the load has run for half a
    second. CUDA only. `clip`, `fold_clip`: as `AdamWKernel.step` takes them; `timer(fn, repeats)`:
    seconds per call (diagnostics pass one that keeps every sample)."""
    group_params, repeats = ((1 << 20), 2) if quick else ((64 << 20), 15)
    from offload.cpu_optimizer import AdamWKernel
    from offload.pinned import PinnedPool

    pool = PinnedPool()

    def pinned(num_elements: int, dtype: torch.dtype) -> torch.Tensor:
        num_bytes = num_elements * dtype.itemsize
        return pool.acquire(num_bytes).view(num_bytes).view(dtype)

    states = [pinned(3 * group_params, torch.float32).fill_(0.5).view(3, group_params) for _ in range(num_groups)]
    grads = [pinned(group_params, torch.float32).normal_() for _ in range(num_groups)]
    weights = [pinned(group_params, torch.bfloat16) for _ in range(num_groups)]
    kernel = AdamWKernel("torch", betas=(0.9, 0.95), eps=1e-8, fold_clip=fold_clip)
    adam_steps = iter(range(1, 1 << 30))

    def adamw() -> None:
        step = next(adam_steps)
        for state, grad in zip(states, grads):
            kernel.step(state[0], grad, state[1], state[2], step=step, lr=1e-4, weight_decay=0.1, clip=clip)

    def cast() -> None:  # the worker's publish: updated fp32 masters into the bf16 weights' home
        for state, weight in zip(states, weights):
            weight.copy_(state[0])

    copy_bytes = 256 * MiB
    host_in, host_out = pinned(copy_bytes, torch.uint8), pinned(copy_bytes, torch.uint8)
    device_in = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    device_out = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    streams = {"h2d": torch.cuda.Stream(), "d2h": torch.cuda.Stream(), "compute": torch.cuda.Stream()}
    work = {
        "h2d": lambda: device_in.copy_(host_in, non_blocking=True),
        "d2h": lambda: host_out.copy_(device_out, non_blocking=True),
        # the probe's block, launched from Python as the runtime's main thread launches its blocks
        "compute": block_workload(quick),
    }
    stop = threading.Event()

    def load() -> None:  # the runtime's steady state: a block computing, copies both ways, waited on asleep
        while not stop.is_set():
            events = []
            for name, stream in streams.items():
                with torch.cuda.stream(stream):
                    work[name]()
                    events.append(torch.cuda.Event(blocking=True))
                    events[-1].record(stream)
            for event in events:
                event.synchronize()

    loader = threading.Thread(target=load, name="probe-load", daemon=True)
    loader.start()
    try:
        time.sleep(0.05 if quick else 0.5)  # into the load's steady state: its first block allocates
        adam_s = timer(adamw, repeats)
        cast_s = timer(cast, repeats)
    finally:
        stop.set()
        loader.join()
        torch.cuda.synchronize()
        pool.close()
    num_params = group_params * num_groups
    return num_params / adam_s / 1e9, (4 + 2) * num_params / cast_s / 1e9


def _aligned(num_bytes: int) -> torch.Tensor:
    backing = torch.empty(num_bytes + 4096, dtype=torch.uint8)
    offset = (-backing.data_ptr()) % 4096
    return backing[offset:offset + num_bytes]


def duplex_pass(backend, source, target, ahead: torch.Tensor, behind: torch.Tensor, offsets) -> float:
    """Seconds for the optimizer's disk pattern over two open files: at each offset one group read from
    `source` into `ahead` while `behind` is written to `target`, both in flight, group after group; then fsync."""
    start_s = time.perf_counter()
    for offset in offsets:
        reading, writing = backend.read(source, ahead, offset), backend.write(target, behind, offset)
        reading.result()
        writing.result()
    os.fsync(target.fd)
    return time.perf_counter() - start_s


def ssd_gbps(directory: str, file_bytes: int, chunk_bytes: int = 64 * MiB, group_bytes: int = 512 * MiB,
             passes: int = 3) -> tuple[float, float, float, bool]:
    """(write, read, duplex) GB/s under `directory` through offload's PosixBackend, and whether the I/O
    bypassed the page cache (O_DIRECT).

    write, read: one `file_bytes` file in `chunk_bytes` requests, all in flight at once.
    duplex: the optimizer's pattern on two such files: group g read (ahead) while group g of the other
        file is written (behind), one group of `group_bytes` each way in flight, group after group; the
        next pass reads what the last one wrote, as the next step reads the state this one wrote back.
        Bytes read + written per second, the median of `passes` after one warm-up pass. Why this pattern
        and not every request in flight: on the H100 machine's virtual disk the deep queue gave 1.48-1.96
        GB/s read + written in one call, the optimizer's pattern 1.98-2.23 after its first pass, and the
        runtime's split steps moved their state at rates only the latter explains (RESULTS.md, issue 5).
    """
    from offload.ssd import PosixBackend

    os.makedirs(directory, exist_ok=True)
    chunk_bytes = min(chunk_bytes, file_bytes)
    group_bytes = min(group_bytes, file_bytes)
    backend = PosixBackend()
    paths, handles = [], []
    try:
        for _ in range(2):
            fd, path = tempfile.mkstemp(prefix="fuyou-probe-", suffix=".bin", dir=directory)
            paths.append(path)
            os.ftruncate(fd, file_bytes)
            os.close(fd)
            handles.append(backend.open(path))
        buffers = [_aligned(chunk_bytes).fill_(7) for _ in range(4)]
        offsets = range(0, file_bytes - chunk_bytes + 1, chunk_bytes)

        def run(io, handle) -> float:
            start_s = time.perf_counter()
            pending = [io(handle, buffers[i % len(buffers)], offset) for i, offset in enumerate(offsets)]
            for future in pending:
                future.result()
            if io == backend.write:
                os.fsync(handle.fd)
            return time.perf_counter() - start_s

        done_bytes = len(offsets) * chunk_bytes
        write_s = run(backend.write, handles[0])
        os.posix_fadvise(handles[0].fd, 0, 0, os.POSIX_FADV_DONTNEED)  # reads from the disk, not RAM
        read_s = run(backend.read, handles[0])

        ahead, behind = _aligned(group_bytes), _aligned(group_bytes).fill_(7)
        group_offsets = range(0, file_bytes - group_bytes + 1, group_bytes)

        # pass k reads the file pass k-1 wrote; pass 0 (reading the write test's file) is the warm-up. The
        # median, as for every rate the runtime meets beside other work (`_median_timed`).
        duplex_s = statistics.median([duplex_pass(backend, handles[k % 2], handles[(k + 1) % 2], ahead, behind, group_offsets)
                                      for k in range(passes + 1)][1:])
        duplex_bytes = 2 * len(group_offsets) * group_bytes
        direct = handles[0].direct
    finally:
        for handle in handles:
            backend.close(handle)
        backend.shutdown()
        for path in paths:
            os.unlink(path)
    return done_bytes / write_s / 1e9, done_bytes / read_s / 1e9, duplex_bytes / duplex_s / 1e9, direct


def probe(ssd_dir: str | None = None, *, quick: bool = False, log=print) -> HardwareProfile:
    """Measures this machine (see the module docstring).

    Args:
        ssd_dir: where to write the SSD test file (default: the system temp directory).
        quick: small sizes, seconds in all (for CI); the rates are then far below the hardware's.
        log: called with one line per measurement.
    """
    notes = [f"fuyou probe{' --quick' if quick else ''} {datetime.date.today().isoformat()} on {platform.node()}"]
    ssd_dir = ssd_dir or tempfile.gettempdir()
    cuda = torch.cuda.is_available()
    if cuda:
        name = torch.cuda.get_device_name()
        gpu_tflops = gemm_tflops(1024 if quick else 8192, "cuda", torch.bfloat16, 3 if quick else 20)
        fp8, why = fp8_tflops(1024 if quick else 8192, 3 if quick else 20)
        notes.append(f"GPU {name}: bf16 GEMM measured; FP8 {why}")
        gpu_memory_gb = torch.cuda.mem_get_info()[1] / GiB
        h2d, d2h, duplex = pcie_gbps((64 * MiB) if quick else GiB, 3 if quick else 10)
    else:
        name = "cpu"
        threads = torch.get_num_threads()
        gpu_tflops = gemm_tflops(512 if quick else 2048, "cpu", torch.float32, 5 if quick else 10)
        fp8, duplex = 0.0, None
        notes.append(f"no CUDA GPU: compute_device cpu, gpu_tflops is an fp32 CPU matmul on {threads} threads, "
                     "h2d/d2h a host memory copy, gpu_fp8_tflops 0 (absent)")
        gpu_memory_gb = psutil.virtual_memory().available / GiB
        h2d = d2h = memcpy_gbps((64 * MiB) if quick else GiB, 3 if quick else 10)
    log(f"compute: {gpu_tflops:.2f} TFLOPS ({'bf16' if cuda else 'fp32 CPU'}), FP8 {fp8:.1f}")
    log(f"transfers: H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s" + (f", both at once {duplex:.1f} GB/s" if duplex else ""))
    efficiency, block_shape = (None, "")
    if cuda:
        efficiency, block_shape = block_efficiency(gpu_tflops, quick)
        notes.append(f"block efficiency: {block_shape}, bf16 autocast")
        log(f"transformer block forward+backward: {efficiency:.2f} of the GEMM rate ({block_shape})")
    cpu_pass = 2 * memcpy_gbps((64 * MiB) if quick else GiB, 3 if quick else 5)  # read + written
    log(f"CPU memory pass: {cpu_pass:.1f} GB/s read + written")
    adam, kind = adam_gparams_per_s((2 << 20) if quick else (256 << 20), 2 if quick else 5)
    notes.append(f"CPU AdamW: torch {kind}, {torch.get_num_threads()} threads")
    log(f"CPU AdamW ({kind}): {adam:.2f} Gparam/s")
    adam_loaded = pass_loaded = adam_clipped = None
    if cuda:
        adam_loaded, pass_loaded = cpu_rates_under_load(quick)
        adam_clipped, _ = cpu_rates_under_load(quick, clip=0.5)
        notes.append("CPU under load: AdamWKernel (with and without a clip factor) and the fp32 -> bf16 cast on "
                     "pinned 4-group states while the block workload and both PCIe directions run")
        log(f"CPU under the runtime's load: AdamW {adam_loaded:.2f} Gparam/s ({adam_clipped:.2f} clipped), "
            f"cast pass {pass_loaded:.1f} GB/s")
    try:
        write, read, duplex_ssd, direct = ssd_gbps(ssd_dir, (32 * MiB) if quick else 4 * GiB,
                                                   group_bytes=(8 * MiB) if quick else 512 * MiB)
    except OSError as error:
        raise FuyouError(f"cannot test the SSD under {ssd_dir} ({error.strerror or error}); pass --ssd-dir "
                         "a writable directory on the SSD(s)") from None
    notes.append(f"SSD under {ssd_dir}: {'O_DIRECT' if direct else 'buffered (no O_DIRECT there: page-cache rates, not the disk)'}, "
                 "one drive as the OS sees it")
    log(f"SSD {ssd_dir}: write {write:.2f} GB/s, read {read:.2f} GB/s, both at once {duplex_ssd:.2f} GB/s"
        f"{'' if direct else ' (buffered)'}")
    profile = HardwareProfile(
        name=f"probed-{platform.node() or 'machine'}",
        compute_device="cuda" if cuda else "cpu",
        gpu_tflops=gpu_tflops,
        gpu_fp8_tflops=fp8,
        gpu_memory_gb=round(gpu_memory_gb, 2),
        h2d_gbps=h2d,
        d2h_gbps=d2h,
        pcie_duplex_gbps=duplex,
        cpu_memory_gb=round(psutil.virtual_memory().available / GiB, 1),
        cpu_adam_gparams_per_s=adam,
        ssd_read_gbps=read,
        ssd_write_gbps=write,
        ssd_count=1,
        ssd_capacity_gb=round(shutil.disk_usage(ssd_dir).free / GiB, 1),
        block_efficiency=efficiency,
        cpu_memory_gbps=cpu_pass,
        cpu_adam_loaded_gparams_per_s=adam_loaded,
        cpu_memory_loaded_gbps=pass_loaded,
        cpu_adam_clipped_loaded_gparams_per_s=adam_clipped,
        ssd_duplex_gbps=duplex_ssd,
        source="; ".join(notes),
    )
    return profile


def write_profile(profile: HardwareProfile, path: str | Path) -> None:
    profile.to_yaml(path, header=f"{profile.name}: written by fuyou probe\n{profile.source}")
