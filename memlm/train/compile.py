"""``memlm compile``: compile a config's train step ahead of time for a target topology.

Memory is planned before it is rented: the step is lowered with abstract inputs (nothing is
allocated) and compiled for the target, and the report gives the per-device bytes (arguments,
temporaries, outputs, their total against the device's capacity) and every collective with its
per-device bytes. Topologies:

- ``cpu:N``: N host devices of this machine (``--xla_force_host_platform_device_count``), a
  stand-in for any accelerator when ``--capacity`` says how much memory it has (default 80e9,
  an 80 GB GPU);
- a TPU topology name (``v5p:2x2x1``, ``v5e:4x4``, ``v4:2x2x1``, ``v6e:2x2``...): libtpu's
  compile-only client (the ``memlm[tpu]`` extra), no TPU needed. The TPU compiler itself refuses
  a program that does not fit; that refusal is reported as not fitting, with its numbers.
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections

from memlm.config import mesh_shape

# HBM per chip (bytes) where a compile-only device cannot tell.
TPU_CAPACITY = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5litepod": 16 * 2**30, "v5p": int(95.74 * 2**30),
                "v6e": 32 * 2**30}
CPU_CAPACITY = 80e9


class CompileError(ValueError):
    """A topology cannot be built or the step does not fit; the message is one line."""


def parse_topology(topology: str) -> tuple[str, str]:
    """("cpu", "N") or ("tpu", name); fails naming the topology."""
    if re.fullmatch(r"cpu:\d+", topology):
        return "cpu", topology.split(":")[1]
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", topology):
        return "tpu", topology
    raise CompileError(f"--topology {topology!r}: expected cpu:N or a TPU topology such as v5p:2x2x1")


def prepare_environment(topology: str) -> None:
    """Before jax is imported: enough host devices for ``cpu:N``; the CPU platform for compiling."""
    kind, arg = parse_topology(topology)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if kind == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={arg}".strip()
    else:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a compile-only client next to other jax processes


def topology_devices(topology: str) -> tuple[list, float | None, str]:
    """(devices, capacity per device in bytes or None, a description) of a topology."""
    import jax

    kind, arg = parse_topology(topology)
    if kind == "cpu":
        n = int(arg)
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise CompileError(f"--topology {topology}: this process has {len(devices)} CPU devices; run `memlm "
                               f"compile` in a fresh process (it sets --xla_force_host_platform_device_count)")
        return devices[:n], None, f"{n} host devices"
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="tpu", topology_name=arg, chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu missing, or a name it does not know
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CompileError(f"--topology {topology}: cannot build it with libtpu's compile-only client ({first}); "
                           "install the extra: pip install 'memlm[tpu]'") from None
    devices = list(desc.devices)
    generation = arg.split(":")[0]
    return devices, TPU_CAPACITY.get(generation), f"{len(devices)} x {devices[0].device_kind}"


def abstract_batch(cfg: ml_collections.ConfigDict, shardings: dict, plan=None) -> dict:
    """The global batch as ShapeDtypeStructs in the step's shardings (with levels off device, the
    per-shard slot ids of ``plan``)."""
    import jax
    import jax.numpy as jnp

    b, s, depth = cfg.train.batch_size, cfg.data.seq_len, cfg.tree.depth
    shapes = {"tokens": (b, s), "segment_ids": (b, s), "positions": (b, s), "paths": (b, depth), "generic": (b,),
              "sibling": (b,)}
    out = {k: jax.ShapeDtypeStruct(v, jnp.bool_ if k in ("generic", "sibling") else jnp.int32, sharding=shardings[k])
           for k, v in shapes.items() if k in shardings}
    if plan is not None and "slots" in shardings:
        out["slots"] = {k: jax.ShapeDtypeStruct((pl.shards, pl.slots), jnp.int32, sharding=shardings["slots"][k])
                        for k, pl in plan.off_device.items()}
    return out


def _exhausted(message: str) -> tuple[float | None, float | None]:
    """(needed, available) bytes from an XLA RESOURCE_EXHAUSTED message, when it says them."""
    def size(text):
        m = re.match(r"([\d.]+)([KMGT]?)", text)
        return float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)] if m else None

    used = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if used:
        return size(used.group(1)), size(used.group(2))
    temps = re.search(r"required for [^(]*\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)", message)
    if temps:
        return size(temps.group(1)), size(temps.group(2))
    over = re.search(r"exceeds? .*?by ([\d.]+[KMGT]?)", message)
    return (size(over.group(1)), None) if over else (None, None)


def compile_report(cfg: ml_collections.ConfigDict, topology: str, capacity: float | None = None) -> dict[str, Any]:
    """Compile ``cfg``'s step for ``topology``; the report of DESIGN §4.14 (``fits`` says whether it fits)."""
    from memlm.bank.device import tier_bytes
    from memlm.sharding import MESH_AXES, make_mesh
    from memlm.train import hlo
    from memlm.train.step import build

    devices, known, description = topology_devices(topology)
    if capacity is None:
        capacity = known if known is not None else (CPU_CAPACITY if topology.startswith("cpu:") else None)
    shape = mesh_shape(cfg, len(devices))
    mesh = make_mesh(shape, devices)
    fns = build(cfg, mesh)
    report: dict[str, Any] = {
        "config": cfg.name, "topology": topology, "devices": description,
        "mesh": dict(zip(MESH_AXES, shape, strict=True)), "global_batch": cfg.train.batch_size,
        "microbatch": fns.plan.microbatch, "micro_steps": fns.plan.micro_steps,
        "tiers": tier_bytes(fns.bank_layout, fns.plan.levels, cfg.bank.host_cache_bytes) if fns.bank_layout else [],
    }
    lowered = fns.step.lower(fns.abstract_state(), abstract_batch(cfg, fns.batch_shardings, fns.plan))
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own error types
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        needed, available = _exhausted(text)
        report.update(per_device={"arguments": None, "temporaries": None, "outputs": None, "total": needed,
                                  "capacity": available or capacity}, fits=False, collectives=[],
                      error=" ".join(text.split())[:600])
        return report
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    text = compiled.as_text()
    report.update(
        per_device={"arguments": ma.argument_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
                    "outputs": ma.output_size_in_bytes, "aliased": ma.alias_size_in_bytes, "total": total,
                    "capacity": capacity},
        fits=capacity is None or total <= capacity,
        collectives=hlo.summary(hlo.collectives(text)),
        largest_buffers=hlo.largest_buffers(text),
    )
    return report


def misfit_line(report: dict) -> str:
    """The one line a config that does not fit exits with."""
    pd = report["per_device"]
    need = f"{pd['total'] / 1e9:.1f} GB" if pd.get("total") else "more than"
    have = f"{pd['capacity'] / 1e9:.1f} GB" if pd.get("capacity") else "the device's memory"
    where = "; largest buffers: " + ", ".join(report["largest_buffers"]) if report.get("largest_buffers") else ""
    if report.get("error"):
        where = f"; compiler: {report['error'][:300]}"
    return (f"{report['config']} does not fit {report['topology']} at batch {report['global_batch']} "
            f"(micro-batch {report['microbatch']}): needs {need} per device, has {have}{where}")
