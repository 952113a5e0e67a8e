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

``--holdout`` makes the pick a per-corpus procedure that can be checked: each probe file's questions
are split in two halves, balanced per bucket (alternating in the order of a hash of the question), the
setting is picked by the same rule on the first half only, and the pick's figures on the other half
(``holdout`` in the output) say whether the choice carries to questions it was not chosen on.
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


def pick(rows: list[dict]) -> tuple[str | None, bool]:
    """(the picked setting's label, whether it meets the rule on every probe) of rows
    ``{"setting", "probes": {name: {"meets", "worst_margin", "accuracy"}}}``: the most accurate row
    meeting the rule on every probe, else the row with the largest worst-bucket margin."""
    meets = [r for r in rows if all(p["meets"] for p in r["probes"].values())]
    if not rows:
        return None, False
    if meets:
        return max(meets, key=lambda r: np.mean([p["accuracy"] for p in r["probes"].values()]))["setting"], True
    return max(rows, key=lambda r: min(p["worst_margin"] for p in r["probes"].values()))["setting"], False


def halves(keys: list[str], buckets: list[str | None]) -> np.ndarray:
    """int ``[n]``, 0 or 1: a split of the questions into two halves balanced per bucket (within a
    bucket, alternating in the order of a hash of the question), the same on every run."""
    import hashlib

    half = np.zeros(len(keys), np.int64)
    for b in dict.fromkeys(buckets):
        rows = [i for i in range(len(keys)) if buckets[i] == b]
        rows.sort(key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
        half[rows[1::2]] = 1
    return half


def on_rows(outputs: list[dict], take: np.ndarray) -> dict:
    """``{"accuracy", "by_bucket"}`` of the scored questions ``outputs`` where ``take`` is true."""
    from memlm.eval.probes import bucket_order

    chosen = [o for o, t in zip(outputs, take, strict=True) if t]
    by = {}
    for b in bucket_order(o["bucket"] for o in chosen if o["bucket"] is not None):
        hits = [o["correct"] for o in chosen if o["bucket"] == b]
        by[b] = sum(hits) / len(hits)
    return {"accuracy": sum(o["correct"] for o in chosen) / max(len(chosen), 1), "by_bucket": by}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", default="off")
    ap.add_argument("--quantiles", default="", help="comma list, e.g. 0.1,0.25: distance gates gating that share")
    ap.add_argument("--quantile-levels", default="1,2")
    ap.add_argument("--holdout", action="store_true",
                    help="pick on one half of each probe file's questions, report the pick on the other")
    args = ap.parse_args()

    from memlm.data.records import read_manifest
    from memlm.eval.probes import evaluate_probes, load_probes
    from memlm.infer.beam import BeamRouting, uses_beam
    from memlm.infer.run import load_run
    from memlm.retrieval.confidence import path_scores

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

    outputs: dict[str, dict] = {}  # setting label -> probe -> condition -> the scored questions

    def score(conditions, provider, label: str) -> dict:
        out = {}
        for name, ps in probes.items():
            r = evaluate_probes(run.fn, run.params, run.tokenizer, ps, provider, conditions, return_outputs=True,
                                max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
            out[name] = r["conditions"]
            outputs.setdefault(label, {})[name] = r["outputs"]
        return out

    t = time.time()
    base = score(("none", "generic", "fetched"), run.memory, "base")
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
        res = score(("fetched",), provider, label(setting))
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
    chosen, meets = pick(results["settings"])
    if chosen is not None:
        results["pick"], results["pick_meets"] = chosen, meets
        print(f"pick: {chosen} ({'meets the rule on every probe' if meets else 'none meets the rule'})")
    if args.holdout and results["settings"]:
        results["holdout"] = holdout(probes, outputs, [r["setting"] for r in results["settings"]])
    Path(args.out).write_text(json.dumps(results, indent=2))


def holdout(probes: dict, outputs: dict, labels: list[str]) -> dict:
    """Pick on half 0 of each probe file, then the pick's verdicts on half 1 (``--holdout``)."""
    split = {name: halves([p.key for p in ps], [p.bucket for p in ps]) for name, ps in probes.items()}
    per_half = []
    for h in (0, 1):
        rows = []
        for lab in labels:
            row = {"setting": lab, "probes": {}}
            for name in probes:
                take = split[name] == h
                none, greedy = (on_rows(outputs["base"][name][c], take) for c in ("none", "fetched"))
                cand = on_rows(outputs[lab][name]["fetched"], take)
                ok, margin = verdict(none, greedy, cand)
                row["probes"][name] = {**cand, "meets": ok, "worst_margin": margin,
                                       "none": none, "greedy": greedy}
            rows.append(row)
        per_half.append(rows)
    chosen, meets = pick(per_half[0])
    check = next(r for r in per_half[1] if r["setting"] == chosen)
    print(f"holdout: picked on half 0: {chosen} ({'meets' if meets else 'misses'} the rule there); on half 1:")
    for name, r in check["probes"].items():
        print(f"  {name:>14} {100 * r['accuracy']:5.1f}  " + " ".join(f"{100 * v:5.1f}" for v in
              r["by_bucket"].values()) + f"  none {100 * r['none']['accuracy']:5.1f}  greedy "
              f"{100 * r['greedy']['accuracy']:5.1f}  meets {r['meets']}  worst {100 * r['worst_margin']:+.1f}")
    return {"pick": chosen, "pick_meets": meets, "check": check,
            "check_meets": all(p["meets"] for p in check["probes"].values())}


if __name__ == "__main__":
    main()
