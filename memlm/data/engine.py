"""Where prepare's work units run: in this process, or on an Apache Beam pipeline (``--workers N``).

Both engines run the same unit functions (``memlm.data.units``) with the same arguments, and a
unit's outputs depend only on its inputs, so one process and N workers write byte-identical files.

Why Beam for the parallel engine: it runs the same pipeline on one machine (the DirectRunner, with
N worker processes) and on clusters (Dataflow, Flink, Spark) through runner options alone; its
shuffle (``GroupByKey``) is what grouping every unit of a leaf together needs at corpus scale; and
it installs beside the pinned jax / orbax / grain / tensorstore. Ray Data would have meant a second
cluster manager for the same job. One process needs none of it: :class:`LocalEngine` loops over
the units and groups the routed payloads by pack range in memory (a few dozen bytes a unit).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Iterable
from typing import Any

from memlm.data import units as U

__all__ = ["BeamEngine", "EngineError", "LocalEngine", "engine_for"]


class EngineError(ValueError):
    """The engine settings are unusable (e.g. ``--workers 0``)."""


class LocalEngine:
    """Every unit in this process, in order."""

    runner = "local"
    workers = 1

    def run_units(self, label: str, elements: list, fn: Callable, *args: Any) -> None:
        for element in elements:
            fn(element, *args)

    def route_and_pack(self, units: list[int], route_spec: U.RouteSpec, pack_spec: U.PackSpec) -> None:
        """Route every unit, group the payloads by pack range, pack the pending ranges."""
        by_range: dict[int, list[dict[str, Any]]] = {r: [] for r in sorted(route_spec.pending_ranges)}
        for unit in units:
            for r, payload in U.route_unit(unit, route_spec):
                if r >= 0:
                    by_range[r].append(payload)
        for r, payloads in by_range.items():
            U.pack_range(r, payloads, pack_spec)


class BeamEngine:
    """The units on a Beam pipeline: the DirectRunner with ``workers`` processes unless the pipeline
    options name another runner."""

    runner = "beam"

    def __init__(self, workers: int, pipeline_options: str | Iterable[str] = ()):
        from apache_beam.options.pipeline_options import PipelineOptions

        flags = shlex.split(pipeline_options) if isinstance(pipeline_options, str) else list(pipeline_options)
        mode = "in_memory" if workers == 1 else "multi_processing"
        self.workers = workers
        self.options = PipelineOptions(flags=flags, direct_num_workers=workers, direct_running_mode=mode,
                                       default_sdk_harness_log_level="WARNING")
        for name in ("apache_beam", "root"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def run_units(self, label: str, elements: list, fn: Callable, *args: Any) -> None:
        """One pipeline applying ``fn(element, *args)`` to every element on the workers."""
        import apache_beam as beam

        if not elements:
            return
        with beam.Pipeline(options=self.options) as p:
            _ = (p | f"{label} units" >> beam.Create(elements) | f"{label} spread" >> beam.Reshuffle()
                 | f"{label}" >> beam.Map(fn, *args))

    def route_and_pack(self, units: list[int], route_spec: U.RouteSpec, pack_spec: U.PackSpec) -> None:
        """Route every unit, shuffle the payloads by pack range, pack the pending ranges."""
        import apache_beam as beam

        with beam.Pipeline(options=self.options) as p:
            routed = (p | "route units" >> beam.Create(units) | "route spread" >> beam.Reshuffle()
                      | "route" >> beam.FlatMap(U.route_unit, route_spec)
                      | "payloads" >> beam.Filter(lambda kv: kv[0] >= 0))
            pending = p | "ranges" >> beam.Create([(r, None) for r in sorted(route_spec.pending_ranges)])
            _ = ({"payloads": routed, "range": pending} | "group by range" >> beam.CoGroupByKey()
                 | "pack" >> beam.Map(lambda kv, spec: U.pack_range(kv[0], list(kv[1]["payloads"]), spec),
                                      pack_spec))


def engine_for(workers: int | None, pipeline_options: str | Iterable[str] = ()) -> LocalEngine | BeamEngine:
    """One process without workers or pipeline options; else the Beam engine."""
    if workers is not None and workers < 1:
        raise EngineError(f"--workers {workers}: must be at least 1")
    if workers is None and not pipeline_options:
        return LocalEngine()
    return BeamEngine(workers or 1, pipeline_options)
