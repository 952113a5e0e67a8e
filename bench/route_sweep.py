"""Accuracy per frequency bucket of one trained run's ``fetched`` memory under routing settings.

    python bench/route_sweep.py --workdir runs/facts/memory --out runs/facts/sweep.json \
        --settings "off; distance:1:0.6; margin:1:0.02; beam:4; beam:4:generic"

Loads the run once and scores its built-in probes under ``none``, ``generic`` and plain greedy
``fetched``, then ``fetched`` again under each setting: ``MODE:LEVEL:THRESHOLD`` for the
confidence gate (``eval.route_gate*``), ``beam:W`` or ``beam:W:generic`` for beam routing
(``eval.route_beam*``), ``descent[:W][:generic][:pQ][:none]`` for the likelihood
descent (``eval.route_descent``, ``route_descent_width`` W, ``route_posterior`` Q, ``route_fallback``
none), each alone; ``:aC`` after any of them adds the anchor gate (``eval.route_anchor_confidence`` C),
e.g. ``off:none:a0.5`` (greedy, the anchor alone where it is confident) or ``descent:2:p0.5:none:a0.5``.
``--quantiles`` adds distance and margin gates at those
quantiles of the probes' own distances to their level's node (the farthest share gated) and
margins to its nearest sibling (the closest calls gated). The pick: the setting that keeps every
bucket at or above ``none`` and the rarest bucket at least at plain greedy's accuracy, with the
best overall accuracy; failing that, the one with the largest worst-bucket margin over ``none``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_setting(text: str) -> dict:
    """One setting; ``:aC`` after any of them adds the anchor gate (``route_anchor_confidence`` C)."""
    parts = text.strip().split(":")
    anchor = [float(o[1:]) for o in parts[1:] if o.startswith("a")]
    if anchor:
        setting = parse_setting(":".join(o for o in parts if not o.startswith("a")))
        fallback = {"route_fallback": "none"} if "none" in parts else {}
        return {**setting, **fallback, "route_anchor_confidence": anchor[0]}
    if parts[0] == "off":
        return {"route_gate": "off"}
    if parts[0] == "descent":  # descent[:W][:generic][:pQ][:none]
        opts = parts[1:]
        width = next((int(o) for o in opts if o.isdigit()), 1)
        post = next((float(o[1:]) for o in opts if o.startswith("p")), 0.0)
        return {"route_gate": "off", "route_descent": "likelihood", "route_descent_width": width,
                "route_beam_generic": "generic" in opts, "route_posterior": post,
                "route_fallback": "none" if "none" in opts else "generic"}
    if parts[0] == "beam":
        return {"route_gate": "off", "route_beam": int(parts[1]), "route_beam_generic": parts[2:] == ["generic"]}
    mode, level, threshold = parts
    return {"route_gate": mode, "route_gate_level": int(level), "route_gate_threshold": float(threshold)}


def label(setting: dict) -> str:
    if setting.get("route_anchor_confidence"):
        plain = {k: v for k, v in setting.items() if k != "route_anchor_confidence"}
        fallback = ":none" if setting.get("route_fallback") == "none" and ":none" not in label(plain) else ""
        return label(plain) + fallback + f":a{setting['route_anchor_confidence']:g}"
    if setting.get("route_descent") == "likelihood":
        width = setting.get("route_descent_width", 1)
        generic = ":generic" if setting.get("route_beam_generic") else ""
        post = f":p{setting['route_posterior']:g}" if setting.get("route_posterior") else ""
        fallback = ":none" if setting.get("route_fallback") == "none" else ""
        return "descent" + (f":{width}" if width > 1 else "") + generic + post + fallback
    if setting.get("route_beam", 1) > 1 or setting.get("route_beam_generic"):
        return f"beam:{setting['route_beam']}" + (":generic" if setting.get("route_beam_generic") else "")
    if setting["route_gate"] == "off":
        return "off"
    return f"{setting['route_gate']}:{setting['route_gate_level']}:{setting['route_gate_threshold']:.4f}"


def verdict(none: dict, greedy: dict, cand: dict) -> tuple[bool, float]:
    """(meets the acceptance rule, worst bucket margin over none) for one probe's results."""
    buckets = sorted(none["by_bucket"], key=float)
    margin = min(cand["by_bucket"][b] - none["by_bucket"][b] for b in buckets)
    rare = buckets[0]
    keeps_rare = cand["by_bucket"][rare] >= greedy["by_bucket"][rare]  # the rare gain over none, at least greedy's
    return margin >= 0 and keeps_rare, margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="off")
    ap.add_argument("--quantiles", default="", help="comma list, e.g. 0.1,0.25: distance gates gating that share")
    ap.add_argument("--quantile-levels", default="1,2")
    args = ap.parse_args()

    from memlm.data.records import read_manifest
    from memlm.eval.beam import BeamRouting, uses_beam
    from memlm.eval.probes import evaluate_probes, load_probes
    from memlm.retrieval.confidence import path_scores
    from memlm.run.inference import load_run

    run = load_run(args.workdir)
    ev = run.cfg.eval
    files = [run.data_dir / f for f in read_manifest(run.data_dir)["probes"].values()]
    probes = {p.stem: load_probes(p) for p in files}
    settings = [parse_setting(s) for s in args.settings.split(";") if s.strip()]
    if args.quantiles:
        keys = [p.key for ps in probes.values() for p in ps]
        dist, margin = path_scores(run.memory.tree, run.memory._embed(keys), run.memory.paths(keys))
        for level in (int(x) for x in args.quantile_levels.split(",")):
            for q in (float(x) for x in args.quantiles.split(",")):
                settings.append({"route_gate": "distance", "route_gate_level": level,
                                 "route_gate_threshold": float(np.quantile(dist[:, level - 1], 1 - q)),
                                 "gated_share": q})
                settings.append({"route_gate": "margin", "route_gate_level": level,
                                 "route_gate_threshold": float(np.quantile(margin[:, level - 1], q)),
                                 "gated_share": q})

    def score(conditions, provider) -> dict:
        return {name: evaluate_probes(run.fn, run.params, run.tokenizer, ps, provider, conditions,
                                      max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)["conditions"]
                for name, ps in probes.items()}

    t = time.time()
    base = score(("none", "generic", "fetched"), run.memory)
    results = {"run": str(run.workdir), "base": base, "settings": []}
    print(f"base ({time.time() - t:.0f} s)")
    for name in probes:
        for c in ("none", "generic", "fetched"):
            r = base[name][c]
            print(f"  {name:>14} {c:>8} {100 * r['accuracy']:5.1f}  " +
                  " ".join(f"{100 * v:5.1f}" for v in r["by_bucket"].values()))
    for setting in settings:
        t = time.time()
        defaults = {"route_gate": "off", "route_gate_level": 1, "route_gate_threshold": 0.0, "route_beam": 1,
                    "route_beam_generic": False, "route_descent": "embedding", "route_descent_width": 1,
                    "route_posterior": 0.0, "route_fallback": "generic", "route_anchor_confidence": 0.0}
        for key, default in defaults.items():
            ev[key] = setting.get(key, default)
        provider = BeamRouting(run.fn, run.params, run.tokenizer, run.memory, run.cfg) if uses_beam(run.cfg) \
            else run.memory
        res = score(("fetched",), provider)
        row = {"setting": label(setting), **setting, "probes": {}}
        for name in probes:
            cand = res[name]["fetched"]
            keys = [p.key for p in probes[name]]
            ok, margin = verdict(base[name]["none"], base[name]["fetched"], cand)
            row["probes"][name] = {**cand, "meets": ok, "worst_margin": margin,
                                   "gated": float(np.mean(provider.gated(keys))),
                                   "anchor_confident": float(np.mean(provider.anchor_confidence(keys)
                                                                     >= setting["route_anchor_confidence"]))
                                   if setting.get("route_anchor_confidence") else 0.0}
        results["settings"].append(row)
        print(f"{row['setting']} ({time.time() - t:.0f} s)")
        for name, r in row["probes"].items():
            print(f"  {name:>14} {100 * r['accuracy']:5.1f}  " + " ".join(f"{100 * v:5.1f}" for v in
                  r["by_bucket"].values()) + f"  gated {100 * r['gated']:.0f}%  meets {r['meets']}  "
                  f"worst {100 * r['worst_margin']:+.1f}")
    meets = [s for s in results["settings"] if all(p["meets"] for p in s["probes"].values())]
    pool = meets or results["settings"]
    key = ((lambda s: np.mean([p["accuracy"] for p in s["probes"].values()])) if meets else
           (lambda s: min(p["worst_margin"] for p in s["probes"].values())))
    if pool:
        results["pick"] = max(pool, key=key)["setting"]
        results["pick_meets"] = bool(meets)
        print(f"pick: {results['pick']} ({'meets the rule on every probe' if meets else 'none meets the rule'})")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
