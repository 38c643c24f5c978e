"""Book library benchmark: save and load a >= 1M-token Llama-3-8B cache, next to the disk's own speed (needs CUDA).

The cache is the engine's real ``DuoKVCache`` (Llama-3-8B shape, synthetic weights, the Gradient-4194k pattern at
50 % streaming heads, KV4) filled with random codes and scales: synthetic quantized data, the same bytes per token
as a real pre-fill. Measured in one run, in one directory on the machine's disk:

- disk: sequential write of a large file (64 MiB ``os.write`` calls, then fsync) and its read back with O_DIRECT
  (bypasses the page cache) and buffered (may be served from the page cache);
- ``library.save`` (gather through the pinned buffer, sha256 per block, write, fsync);
- ``library.load`` three ways: over a loaded document (verify pass + copy pass), into an empty engine (one pass),
  and into an empty engine after dropping the file from the page cache (cold, where the kernel lets us);
- what the load replaces: the pre-fill time, estimated from shared/docs/kernel-notes.md (no measured 1M pre-fill in
  benchmarks/results yet).

    python -m duo_qserve.bench.library --out DIR    # writes DIR/library-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from duo_qserve import book_format, library
from duo_qserve.engine import ANSWER_RESERVE, DocumentInfo, Engine, EngineSettings
from duo_qserve.environment import commit
from duo_qserve.options import add_engine_args, settings_from_args

# the measured configuration; --pattern names the attention pattern (the Llama-3-8B reference one, in the results)
DEFAULTS = EngineSettings(model="synthetic:llama-3-8b", pattern=None, sparsity=0.5, kv_bits=4, w8a8=False)
PREFILL_S_PER_M_TOKENS_H100 = (
    300.0  # kernel-notes.md: "Prefill at 1 M ... H100 ≈ 5 min" (estimate, attention)
)
IO_BLOCK = 64 << 20


def _mount_of(path: Path) -> dict:
    """The filesystem the benchmark writes to (longest mount point that holds ``path``)."""
    best = {"mount": "?", "fstype": "?", "device": "?"}
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) >= len(best["mount"].strip("?")):
                best = {"mount": mnt, "fstype": fstype, "device": dev}
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    return {**best, "free_bytes": usage.free, "total_bytes": usage.total}


def _drop_from_page_cache(path: Path) -> str:
    """Ask the kernel to forget the file's cached pages; says what worked (nothing checks residency)."""
    how = []
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        how.append("posix_fadvise(DONTNEED)")
    except OSError as e:
        how.append(f"posix_fadvise failed ({e})")
    finally:
        os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        how.append("drop_caches=1")
    except OSError as e:
        how.append(f"drop_caches refused ({e.strerror})")
    return ", ".join(how)


def _read_gbps(path: Path, flags: int, buf: mmap.mmap) -> float:
    """GB/s of reading the whole file sequentially through ``buf`` with ``os.open`` ``flags``."""
    fd = os.open(path, flags)
    try:
        t0 = time.perf_counter()
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
        return offset / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def disk_speed(directory: Path, nbytes: int) -> dict:
    """Sequential write (+ fsync) and read back of ``nbytes``: the ceiling for save and cold load."""
    path = directory / "disk-test.bin"
    data = memoryview(os.urandom(IO_BLOCK))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // IO_BLOCK):
            view = data
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - t0
    out = {"bytes": nbytes, "write_fsync_s": write_s, "write_GBps": nbytes / write_s / 1e9}

    buf = mmap.mmap(-1, IO_BLOCK)  # page aligned, as O_DIRECT needs
    try:
        out["read_direct_GBps"] = _read_gbps(path, os.O_RDONLY | os.O_DIRECT, buf)
    except (OSError, AttributeError) as e:  # no O_DIRECT on this OS or file system
        out["read_direct_GBps"] = None
        out["read_direct_error"] = str(e)
    out["read_buffered_GBps"] = _read_gbps(path, os.O_RDONLY, buf)
    out["read_buffered_note"] = "right after the write: may be served from the page cache"
    path.unlink()
    return out


def sha256_GBps() -> float:
    """One thread; the library hashes SLOTS blocks at once."""
    data = os.urandom(256 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - t0) / 1e9


def pcie_GBps() -> dict:
    """Pinned host <-> GPU copy speed: the ceiling of the gather/scatter through the host buffer."""
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    out = {}
    for name, dst, src in (("device_to_host_GBps", host, dev), ("host_to_device_GBps", dev, host)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[name] = 3 * src.numel() / (time.perf_counter() - t0) / 1e9
    return out


@torch.no_grad()
def synthetic_cache_engine(settings: EngineSettings, tokens: int) -> Engine:
    """An engine with a cache of ``tokens`` document tokens of random quantized data, as if pre-filled."""
    engine = Engine.from_settings(dataclasses.replace(settings, max_tokens=tokens + ANSWER_RESERVE))
    gen = torch.Generator(device=engine.device).manual_seed(0)
    for layer in engine.cache.layers:
        for t in layer.values():
            if t.dtype == torch.uint8:
                t.random_(0, 256, generator=gen)
            else:
                t.uniform_(-1.0, 1.0, generator=gen)
    engine.cache.set_length(tokens)
    ids = torch.arange(tokens, dtype=torch.int64).numpy().tobytes()
    engine.attach_document(
        DocumentInfo("synthetic quantized data", tokens, hashlib.sha256(ids).hexdigest(), 0.0)
    )
    return engine


def fingerprint(engine: Engine) -> torch.Tensor:
    """Per cache piece: byte sum and a position-weighted sum of a strided sample (on the GPU)."""
    layout = library._layout(engine.cache, engine.cache.seq_len)
    sums = []
    for s in library._segments(engine.cache, layout):
        v = s.view
        sample = v[::4099].to(torch.int64)
        sums += [
            v.sum(dtype=torch.int64),
            (sample * torch.arange(1, sample.numel() + 1, device=v.device)).sum(),
        ]
    return torch.stack(sums).cpu()


def timed(fn) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON")
    p.add_argument("--tokens", type=int, default=(1 << 20) + 77, help="document tokens (77 leave an fp tail)")
    add_engine_args(p, DEFAULTS)  # --cpu smoke-tests the script on the CPU (with a small --model/--tokens)
    p.add_argument(
        "--workdir", default=None, help="where the book and the disk test file go (default: library/)"
    )
    p.add_argument("--disk-test-gb", type=float, default=8.0)
    p.add_argument("--commit", default=None, help="commit of the code (default: git rev-parse HEAD)")
    a = p.parse_args(argv)
    if a.pattern is None:
        p.error("--pattern DIR is required (or --pattern none: every head a retrieval head)")
    if not (a.cpu or torch.cuda.is_available()):
        sys.exit("the library benchmark needs a CUDA GPU (--cpu only smoke-tests the script)")
    device = "cpu" if a.cpu else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    work = Path(a.workdir or library.library_dir()) / f".bench-{os.getpid()}"
    work.mkdir(parents=True)
    command = "python -m duo_qserve.bench.library " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"device": device, "date": date, "commit": a.commit or commit(), "command": command,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "filesystem": _mount_of(work),
              "data": "synthetic quantized data: random KV4 codes and scales in the real Llama-3-8B DuoKVCache layout",
              "block_bytes": library.BLOCK_BYTES, "host_buffer_bytes": library.SLOTS * library.BLOCK_BYTES}  # fmt: skip
    try:
        disk_bytes = int(a.disk_test_gb * 1e9) // IO_BLOCK * IO_BLOCK
        result["disk"] = disk_speed(work, disk_bytes)
        print(f"disk: {json.dumps(result['disk'])}", flush=True)
        result["sha256_one_thread_GBps"] = sha256_GBps()
        result["pcie_pinned"] = None if a.cpu else pcie_GBps()
        print(f"sha256 {result['sha256_one_thread_GBps']:.2f} GB/s, pcie {result['pcie_pinned']}", flush=True)

        t0 = time.perf_counter()
        engine = synthetic_cache_engine(settings_from_args(a, DEFAULTS), a.tokens)
        print(f"engine + synthetic cache in {time.perf_counter() - t0:.1f} s", flush=True)
        expected = fingerprint(engine)
        result.update(tokens=a.tokens, pattern=engine.pattern.name, sparsity=engine.sparsity,
                      retrieval_heads=engine.retrieval_heads, kv_bits=engine.cache_config.kv_bits,
                      cache_allocated_bytes=engine.cache.spec.nbytes)  # fmt: skip
        result["identity_s"] = timed(lambda: library._identity(engine))

        book = None

        def do_save():
            nonlocal book
            book = library.save(engine, work)

        save_s = timed(do_save)
        size = book.bytes
        result["book_bytes"] = size
        result["save"] = {"s": save_s, "GBps": size / save_s / 1e9}
        print(f"save {size / 1e9:.2f} GB in {save_s:.2f} s = {size / save_s / 1e9:.2f} GB/s", flush=True)

        loads = {}
        s = timed(lambda: library.load(engine, book))
        loads["over_loaded_document_verify_then_copy"] = {"s": s, "GBps": size / s / 1e9, "passes": 2,
                                                          "page_cache": "file just written: likely hot"}  # fmt: skip
        assert torch.equal(fingerprint(engine), expected), "load over a document changed the cache"
        for name, cold in (("empty_engine_one_pass", False), ("empty_engine_one_pass_cold", True)):
            engine.reset()
            for layer in engine.cache.layers:
                for t in layer.values():
                    t.zero_()
            note = _drop_from_page_cache(Path(book.path) / book_format.DATA) if cold else "likely hot"
            s = timed(lambda: library.load(engine, book))
            loads[name] = {"s": s, "GBps": size / s / 1e9, "passes": 1, "page_cache": note}
            assert torch.equal(fingerprint(engine), expected), (
                f"{name}: loaded cache differs from the saved one"
            )
        result["load"] = loads
        result["loaded_state_matches"] = True
        for name, r in loads.items():
            print(f"load {name}: {r['s']:.2f} s = {r['GBps']:.2f} GB/s ({r['page_cache']})", flush=True)

        est = PREFILL_S_PER_M_TOKENS_H100 * a.tokens / 1e6
        result["prefill_replaced"] = {
            "estimate_s": est,
            "source": "estimate from shared/docs/kernel-notes.md ('Prefill at 1 M ... H100 ≈ 5 min' at 50 % "
            "streaming, attention only); no measured 1M pre-fill in benchmarks/results",
            "speedup_vs_cold_load": est / loads["empty_engine_one_pass_cold"]["s"],
        }
    except Exception as e:
        result["error"] = repr(e)  # what was measured before it still gets written
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"library-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{date}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {out / f'{stem}.json'}")


if __name__ == "__main__":
    main()
