"""StyleGAN2 synthesis speed on CPU: forward and forward+backward at batch 1, 256 px and 1024 px FFHQ shapes.

``python bench/generator.py [--quick] [--json PATH] [--threads 2]``

Random weights (``requires_grad=False``) and a W+ latent ``(1, num_ws, 512)``; "fwd" is one ``synthesis`` under
``no_grad``, "fwd+bwd" is ``synthesis``, ``mean(img²)``, ``backward()`` with grad on W+ only (what inversion does).
Median of 3 runs after 1 warm-up (``--quick``: 256 px only, 1 run).

The reference implementations (rosinality/stylegan2-pytorch and NVlabs/stylegan2-ada-pytorch) cannot run here
(they need their own repositories), so their timings are the ones published in ../shared/fixtures/README.md §7,
measured with the same protocol on a 2-vCPU Xeon @ 2.8 GHz with torch 2.13 CPU (±30 % anchors on a shared VM).
The ratio columns divide our time by those. CPU seconds (user+sys of this process) are printed too: on a busy
machine wall time inflates, CPU time much less.
"""
from __future__ import annotations

import gc
import os
import resource
import time

from _util import parse_args, print_table, write_json  # noqa: E402  (sets sys.path)

import torch  # noqa: E402

from core.stylegan2.network import Generator, GeneratorConfig  # noqa: E402

# fixtures README §7: (fwd s, fwd+bwd s) of the references, 2 threads, batch 1, fp32
REFERENCE = {
    256: {"rosinality": (1.94, 5.02), "nvidia": (0.82, 2.83)},
    1024: {"rosinality": (5.67, 16.25), "nvidia": (2.91, 8.46)},
}
# FFHQ shapes: rosinality channel_multiplier=2 == NVIDIA cbase 32768, cmax 512
CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


def ffhq_config(resolution: int) -> GeneratorConfig:
    return GeneratorConfig(resolution=resolution, z_dim=512, w_dim=512, mapping_layers=8,
                           channels={r: c for r, c in CHANNELS.items() if r <= resolution})


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_gb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def cpu_timed(fn, repeats: int) -> tuple:
    """(median wall s, median CPU s) of ``fn`` after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    walls.sort(), cpus.sort()
    return walls[len(walls) // 2], cpus[len(cpus) // 2]


def bench_config(resolution: int, repeats: int) -> dict:
    torch.manual_seed(0)
    G = Generator(ffhq_config(resolution)).eval().requires_grad_(False)
    ws = torch.randn(1, G.num_ws, G.w_dim)

    def fwd():
        with torch.no_grad():
            G.synthesis(ws, noise_mode="const")

    def fwd_bwd():
        w = ws.clone().requires_grad_(True)
        G.synthesis(w, noise_mode="const").square().mean().backward()

    gc.collect()
    _peak_rss_reset()
    fwd_s, fwd_cpu = cpu_timed(fwd, repeats)
    rss_fwd = _peak_rss_gb()
    fb_s, fb_cpu = cpu_timed(fwd_bwd, repeats)
    rss_fb = _peak_rss_gb()
    ref = REFERENCE[resolution]
    row = {
        "config": f"{resolution}px",
        "params_M": round(sum(p.numel() for p in G.parameters()) / 1e6, 2),
    }
    for i, (kind, wall, cpu) in enumerate((("fwd", fwd_s, fwd_cpu), ("fb", fb_s, fb_cpu))):  # i: REFERENCE column
        row.update({f"{kind}_s": wall, f"{kind}_cpu_s": cpu,
                    f"ref_ros_{kind}_s": ref["rosinality"][i], f"ref_nv_{kind}_s": ref["nvidia"][i],
                    f"{kind}_vs_ros": wall / ref["rosinality"][i], f"{kind}_vs_nv": wall / ref["nvidia"][i]})
    row.update({"peak_rss_fwd_GB": round(rss_fwd, 2), "peak_rss_fb_GB": round(rss_fb, 2)})
    del G
    gc.collect()
    return row


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (the references used 2)"))
    torch.set_num_threads(args.threads)
    resolutions = [256] if args.quick else [256, 1024]
    repeats = 1 if args.quick else 3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [bench_config(r, repeats) for r in resolutions]
    title = (f"StyleGAN2 synthesis, batch 1, fp32, CPU, {args.threads} threads (load average {load:.1f} at start). "
             f"ours = core.stylegan2 (this run); ref_* = rosinality / NVIDIA timings from ../shared/fixtures/"
             f"README.md §7 (measured there on a 2-vCPU Xeon like this machine, not in this run); *_vs_* = ours / ref")
    print_table(rows, title=title)
    write_json(args.json, rows, threads=args.threads, load_average=load, reference="../shared/fixtures/README.md §7")


if __name__ == "__main__":
    main()
