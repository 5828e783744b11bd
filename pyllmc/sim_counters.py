"""pyllmc.sim_counters: the GPU's memory counters, counted on the CUDA simulator.

What decides the speed of a memory-bound kernel is visible without a GPU: how many 32-byte
sectors each warp-level request touches, how many ways each shared-memory access conflicts, and
how many bytes a launch moves against the least it must. The simulator's "counters" build
(PYLLMC_CUDA_SIM_VARIANT=counters, csrc/sim/counters.cpp) records every global and shared access
of kernel code, and this module turns the records into a profiler's table:

    with sim_counters.recording():
        ops.gelu(x, backend="cuda")
    for launch in sim_counters.launches():
        print(sim_counters.format_launch(launch))

Per access site (a load or store of the source, cp.async, ldmatrix), per launch:
  global   requests, sectors per request, and the least sectors the same bytes could take
           (ceil(unique bytes of the request / 32)): Nsight Compute's
           l1tex__t_sectors_pipe_lsu_mem_global_op_{ld,st}.sum / l1tex__t_requests_..., and its
           "uncoalesced" excess.
  shared   wavefronts per request against the phases it needs (ways = wavefronts / phases):
           l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{ld,st} and
           l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{ld,st} (= wavefronts - phases).
Per launch: the distinct global bytes read plus the distinct bytes written (dram__bytes when the
launch finds nothing in cache and fetches each byte once; a byte it writes and then reads back
counts in both, though a real L2 would serve the read) and the same counted per block and summed (L2 traffic if each block's L1 were perfect and blocks
shared nothing).

They are counts of the source's accesses as the simulator runs them (GCC-compiled, one fiber per
thread), not of the GPU's compiled code: caches, timing and occupancy are not modelled, and
nvcc's own choices (vectorized or split accesses, instruction selection) are not seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

from . import cuda_sim

VARIANT = "counters"
SECTOR = 32

# The known-answer kernels of csrc/sim/counters_selftest.cu, in its order: (name, what is counted,
# the value). sectors: global sectors per request of the kernel's read; ways: shared wavefronts
# per phase of its read.
KNOWN_ANSWERS = (
    ("copy", "sectors", 4),
    ("stride2", "sectors", 8),
    ("misaligned", "sectors", 5),
    ("broadcast", "sectors", 1),
    ("float4", "sectors", 16),
    ("float4_stride2", "sectors", 32),
    ("transpose", "ways", 32),
    ("transpose_padded", "ways", 1),
    ("ldmatrix_128B_rows", "ways", 8),
    ("ldmatrix_144B_rows", "ways", 1),
)


@dataclass
class Site:
    """One access site of one launch (summed over its blocks)."""
    file: str          # source file name (csrc/...), "?" when unknown
    line: int
    function: str      # the kernel (template instance) the access is compiled into
    text: str          # the source line, stripped
    space: str         # "global" | "shared"
    write: bool
    width: int         # bytes per lane (the widest access of the site)
    what: str          # "" for a load or store of C++ code; "cp.async", "ldmatrix"
    accesses: int
    bytes: int
    requests: int
    sectors: int
    ideal_sectors: int
    wavefronts: int
    ideal_wavefronts: int

    @property
    def kind(self) -> str:
        op = self.what or ("st" if self.write else "ld")
        return f"{self.space[0]}.{op}" if not self.what else f"{self.what}.{'st' if self.write else 'ld'}"

    @property
    def excess(self) -> int:
        """Sectors (global) or wavefronts (shared) beyond the least the same bytes need."""
        return self.sectors - self.ideal_sectors if self.space == "global" else self.wavefronts - self.ideal_wavefronts

    @property
    def at_ideal(self) -> bool:
        return self.excess == 0

    @property
    def per_request(self) -> float:
        n = max(self.requests, 1)
        return (self.sectors if self.space == "global" else self.wavefronts) / n

    @property
    def ideal_per_request(self) -> float:
        n = max(self.requests, 1)
        return (self.ideal_sectors if self.space == "global" else self.ideal_wavefronts) / n

    @property
    def ways(self) -> float:
        return self.wavefronts / max(self.ideal_wavefronts, 1)

    @property
    def key(self) -> str:
        """What names the site across edits elsewhere in its file: the source text, not its line number."""
        return f"{self.file}|{self.text}|{self.space}|{'st' if self.write else 'ld'}|{self.what}"


@dataclass
class Launch:
    name: str
    blocks: int
    threads_per_block: int
    unique_read: int
    unique_written: int
    block_read: int
    block_written: int
    sites: list = field(default_factory=list)

    def total(self, space: str, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.sites if s.space == space)

    @property
    def excess_sectors(self) -> int:
        return sum(s.excess for s in self.sites if s.space == "global")

    @property
    def excess_wavefronts(self) -> int:
        return sum(s.excess for s in self.sites if s.space == "shared")


# ---------------------------------------------------------------------------------------------
# the simulator's side


def _module_path() -> Path:
    if cuda_sim.variant() != VARIANT:
        raise cuda_sim.BuildError(f"the memory counters need PYLLMC_CUDA_SIM_VARIANT={VARIANT} "
                                  f"(this process has {cuda_sim.variant()!r})")
    cuda_sim.load(VARIANT)
    return Path(cuda_sim._loaded["path"])


@lru_cache(maxsize=None)
def _lib(path: str) -> ctypes.CDLL:
    # The module is already loaded: dlopen of the same file gives the same copy and its state.
    lib = ctypes.CDLL(path)
    lib.pyllmc_counters_json.restype = ctypes.c_char_p
    if hasattr(lib, "pyllmc_counters_known_answer"):  # _C_sim has the self-test kernels; dev/lab's libraries do not
        lib.pyllmc_counters_known_answer.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def lib() -> ctypes.CDLL:
    return _lib(str(_module_path()))


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Count the launches of the block (the previous records are dropped)."""
    handle = lib()
    handle.pyllmc_counters_reset()
    handle.pyllmc_counters_enable(1)
    try:
        yield
    finally:
        handle.pyllmc_counters_enable(0)


def compiler() -> str:
    """The compiler the counts were made with: its choices shape the accesses (see cuda_sim.COUNTERS_KERNEL_FLAGS)."""
    return cuda_sim.toolchain().version


@lru_cache(maxsize=None)
def _source_line(path: str, line: int) -> str:
    try:
        return Path(path).read_text().splitlines()[line - 1].strip()
    except (OSError, IndexError):
        return ""


def _pick_frame(frames: list) -> tuple:
    """Of a site's inline chain (innermost first: (function, file, line)), the frame that names
    it best: the innermost in a kernel file (csrc/*.cu), else in a csrc header, else the innermost."""
    def rank(frame):
        path = frame[1]
        if "/csrc/" in path and "/sim/" not in path.split("/csrc/")[-1] and path.endswith(".cu"):
            return 0
        if "/csrc/" in path and path.endswith(".cuh"):
            return 1
        if "/csrc/" in path and path.endswith(".cu"):
            return 2  # the simulator's own self-test kernels
        return 3
    return min(frames, key=rank)


def symbolize(module: Path, offsets: list) -> dict:
    """offset -> (file, line, function) via addr2line (offsets are return addresses: the call is one byte before)."""
    offsets = sorted(set(o for o in offsets if o))
    if not offsets:
        return {}
    out = subprocess.run(["addr2line", "-a", "-f", "-i", "-C", "-e", str(module)] + [hex(o - 1) for o in offsets],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    result, frames, current = {}, [], None

    def flush():
        if current is not None and frames:
            fn, path, line = _pick_frame(frames)
            result[current] = (path, line, frames[-1][0])

    i = 0
    while i < len(out):
        if out[i].startswith("0x"):
            flush()
            current, frames = int(out[i], 16) + 1, []
            i += 1
            continue
        fn, loc = out[i], out[i + 1] if i + 1 < len(out) else "??:0"
        path, _, rest = loc.rpartition(":")
        try:
            line = int(rest.split()[0])
        except (ValueError, IndexError):
            line = 0
        frames.append((fn, path, line))
        i += 2
    flush()
    return result


def _short_function(name: str) -> str:
    """`void pyllmc::(anonymous namespace)::gelu_forward_kernel<float>(float*, ...)` -> `gelu_forward_kernel<float>`."""
    name = name.split("(")[0] if "(anonymous" not in name.split("(")[0] else name
    head = name
    depth, cut = 0, len(head)
    for i, ch in enumerate(head):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not head.startswith("(anonymous", i):
            cut = i
            break
    head = head[:cut].replace("(anonymous namespace)::", "")
    return head.split("::")[-1] if "<" not in head else head[head.rfind("::", 0, head.find("<")) + 2:]


def launches(module: Optional[Path] = None) -> list:
    """The launches recorded (recording()), with every site named by its source line. `module`: another
    library linked with the counters runtime (dev/lab/'s builds, which record through its own handle);
    default pyllmc._C_sim."""
    path = Path(module) if module is not None else _module_path()
    raw = json.loads(_lib(str(path)).pyllmc_counters_json().decode())
    names = symbolize(path, [s["offset"] for l in raw for s in l["sites"] if not s["file"]])
    result = []
    for l in raw:
        sites = []
        for s in l["sites"]:
            if s["file"]:
                file, line, function = s["file"], s["line"], ""
            else:
                file, line, function = names.get(s["offset"], ("?", 0, "?"))
            sites.append(Site(file=os.path.basename(file), line=line, function=_short_function(function),
                              text=_source_line(file, line), space=s["space"], write=s["write"], width=s["width"],
                              what=s["what"], accesses=s["accesses"], bytes=s["bytes"], requests=s["requests"],
                              sectors=s["sectors"], ideal_sectors=s["ideal_sectors"], wavefronts=s["wavefronts"],
                              ideal_wavefronts=s["ideal_wavefronts"]))
        result.append(Launch(name=l["name"], blocks=l["blocks"], threads_per_block=l["threads_per_block"],
                             unique_read=l["unique_read"], unique_written=l["unique_written"],
                             block_read=l["block_read"], block_written=l["block_written"], sites=sites))
    return result


def known_answers() -> dict:
    """name -> (what, expected, measured) for every kernel of KNOWN_ANSWERS."""
    import torch

    results = {}
    # 256-byte aligned buffers of 4096 floats (torch's CPU allocator aligns to 64 B: over-allocate)
    store = torch.zeros(2 * 4096 + 128)
    base = store.data_ptr()
    start = ((base + 255) // 256 * 256 - base) // 4
    buf_in = store[start:start + 4096]
    buf_in.copy_(torch.arange(4096, dtype=torch.float32))
    buf_out = torch.zeros(4096 + 64)
    start_out = ((buf_out.data_ptr() + 255) // 256 * 256 - buf_out.data_ptr()) // 4
    out = buf_out[start_out:start_out + 4096 - 64]
    for which, (name, what, expected) in enumerate(KNOWN_ANSWERS):
        with recording():
            err = lib().pyllmc_counters_known_answer(which, out.data_ptr(), buf_in.data_ptr())
        if err != 0:
            raise RuntimeError(f"known-answer kernel {name}: CUDA error {err}")
        (launch,) = launches()
        reads = [s for s in launch.sites if not s.write and s.space == ("global" if what == "sectors" else "shared")]
        if len(reads) != 1:
            raise RuntimeError(f"known-answer kernel {name}: expected one {what} read site, got {reads}")
        site = reads[0]
        measured = site.per_request if what == "sectors" else site.ways
        results[name] = (what, expected, measured, site)
    return results


# ---------------------------------------------------------------------------------------------
# the report


def format_launch(launch: Launch, case: str = "") -> str:
    """A profiler's table of one launch: one row per access site."""
    head = (f"{case + ': ' if case else ''}{launch.name}  grid {launch.blocks} x {launch.threads_per_block} thr  "
            f"unique bytes read {launch.unique_read}, written {launch.unique_written}; "
            f"per-block sum read {launch.block_read} ({launch.block_read / max(launch.unique_read, 1):.2f}x), "
            f"written {launch.block_written} ({launch.block_written / max(launch.unique_written, 1):.2f}x)")
    rows = [head, f"  {'site':<24} {'op':<12} {'B':>3} {'requests':>9} {'per req':>8} {'ideal':>6} {'eff':>5} "
                  f"{'ways':>5}  source"]
    # Copies of one source access (template instances, inlined or unrolled copies) make one row.
    merged = {}
    for s in launch.sites:
        row = (s.file, s.line, s.kind, s.width)
        if row not in merged:
            merged[row] = Site(**{**s.__dict__})
        else:
            m = merged[row]
            for attr in ("accesses", "bytes", "requests", "sectors", "ideal_sectors", "wavefronts", "ideal_wavefronts"):
                setattr(m, attr, getattr(m, attr) + getattr(s, attr))
    for (file, line, kind, width), s in sorted(merged.items()):
        eff = s.ideal_per_request / s.per_request if s.per_request else 1.0
        ways = f"{s.ways:.1f}" if s.space == "shared" else ""
        rows.append(f"  {file + ':' + str(line):<24} {kind:<12} {width:>3} {s.requests:>9} "
                    f"{s.per_request:>8.2f} {s.ideal_per_request:>6.2f} {eff:>5.0%} {ways:>5}  {s.text[:70]}")
    return "\n".join(rows)
