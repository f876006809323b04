#!/usr/bin/env python3
"""Across-seed figures of `dpo demo`'s online DPO ablations from per-seed report.json files.

Usage: python3 tools/online_ablations_across_seeds.py OUT/report.json OUT/seeds/seed-2/report.json ...

Recomputes what crates/demo/src/experiment/seeds.rs reports (each variant's final point minus offline DPO's
best point with no more KL; mean, s.e. s/sqrt(k), 95% Student-t interval), so that seeds run as separate
processes (`--set seed=S`) can be aggregated, and adds one comparison the demo does not make: against the
upper concave envelope of offline DPO's points at the same KL. Standard library only.
"""
import json, math, sys
T = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}
reports = [json.load(open(p)) for p in sys.argv[1:]]
names = ["Online DPO", "Online DPO (GT labels)", "Online DPO (offline budget)",
         "Online DPO (GT labels, offline budget)", "Iterative DPO"]
def diff(r, m, judge="ground truth"):
    rows = [x for x in r["equal_kl"] if x["method"] == m and x["judge"] == judge]
    return (rows[-1]["difference"], rows[-1]["kl"], rows[-1]["reward"], rows[-1]["offline_kl"]) if rows else None
def stats(v):
    k = len(v); mean = sum(v) / k
    s = math.sqrt(sum((x - mean) ** 2 for x in v) / (k - 1)) if k > 1 else 0.0
    se = s / math.sqrt(k); h = T.get(k, 2.0) * se
    return mean, se, mean - h, mean + h
def verdict(a, b, mean, se, lo, hi):
    iv = f"{a} ahead" if lo > 0 else f"{b} ahead" if hi < 0 else "no ordering"
    two = f"{a} ahead" if mean > 2 * se else f"{b} ahead" if mean < -2 * se else "no ordering"
    return iv, two
print("seeds:", [r["plan"]["seed"] for r in reports])
for judge in ["ground truth", "learned reward model"]:
    print(f"\n== against offline DPO at equal KL ({judge}) ==")
    for m in names:
        d = [diff(r, m, judge) for r in reports]
        if any(x is None for x in d): continue
        v = [x[0] for x in d]
        mean, se, lo, hi = stats(v)
        iv, two = verdict(m, "offline DPO", mean, se, lo, hi)
        per = ", ".join(f"{x[0]:+.3f} (KL {x[1]:.2f}, R {x[2]:.3f} vs offline KL {x[3]:.2f})" for x in d)
        print(f"{m} - offline DPO: {mean:+.3f} ± {se:.3f} [{lo:+.3f}, {hi:+.3f}] interval: {iv}; 2 s.e.: {two}\n    {per}")
print("\n== ablation contrasts (ground truth) ==")
for a, b in [("Online DPO (GT labels)", "Online DPO"), ("Online DPO (offline budget)", "Online DPO"),
             ("Online DPO (GT labels, offline budget)", "Online DPO (offline budget)"),
             ("Online DPO (GT labels, offline budget)", "Online DPO (GT labels)")]:
    v = [diff(r, a)[0] - diff(r, b)[0] for r in reports]
    mean, se, lo, hi = stats(v)
    iv, two = verdict(a, b, mean, se, lo, hi)
    print(f"{a} - {b}: {', '.join(f'{x:+.3f}' for x in v)} -> {mean:+.3f} ± {se:.3f} [{lo:+.3f}, {hi:+.3f}] interval: {iv}; 2 s.e.: {two}")
print("\n== final points (ground truth) ==")
for m in names:
    pts = []
    for r in reports:
        run = [x for x in r["runs"] if x["method"] == m]
        if run: p = run[-1]["points"][-1]; pts.append(f"KL {p['kl']:.2f} R {p['reward']:.3f}")
    print(m, "; ".join(pts))

# Robustness: offline DPO's frontier as the upper concave envelope of its points (SFT at KL 0 included),
# read at the online point's KL. A mixture of two offline policies reaches the chord's reward with at
# most the chord's KL (KL is convex), so the envelope is reachable offline; the step rule above
# (best point with no more KL) instead compares with a point that may sit far to the left.
def envelope_at(points, x):
    pts = sorted(points)
    best = None
    for i, (k1, r1) in enumerate(pts):
        for k2, r2 in pts[i:]:
            if k1 <= x <= k2:
                r = r1 if k2 == k1 else r1 + (r2 - r1) * (x - k1) / (k2 - k1)
                best = r if best is None else max(best, r)
    return best
print("\n== against offline DPO's concave envelope at the same KL (ground truth) ==")
for m in names:
    v = []
    for r in reports:
        off = [(p["kl"], p["reward"]) for x in r["runs"] if x["method"] == "DPO" for p in x["points"]]
        off.append((r["sft"]["kl"], r["sft"]["reward"]))
        run = [x for x in r["runs"] if x["method"] == m]
        if not run: break
        p = run[-1]["points"][-1]
        e = envelope_at(off, p["kl"])
        if e is None: break
        v.append(p["reward"] - e)
    else:
        mean, se, lo, hi = stats(v)
        iv, two = verdict(m, "offline DPO", mean, se, lo, hi)
        print(f"{m}: {', '.join(f'{x:+.3f}' for x in v)} -> {mean:+.3f} ± {se:.3f} [{lo:+.3f}, {hi:+.3f}] interval: {iv}; 2 s.e.: {two}")
print("\n== envelope contrasts (ground truth) ==")
def env_diff(r, m):
    off = [(p["kl"], p["reward"]) for x in r["runs"] if x["method"] == "DPO" for p in x["points"]]
    off.append((r["sft"]["kl"], r["sft"]["reward"]))
    p = [x for x in r["runs"] if x["method"] == m][-1]["points"][-1]
    return p["reward"] - envelope_at(off, p["kl"])
for a, b in [("Online DPO (GT labels)", "Online DPO"), ("Online DPO (offline budget)", "Online DPO"),
             ("Online DPO (GT labels, offline budget)", "Online DPO (offline budget)"),
             ("Online DPO (GT labels, offline budget)", "Online DPO (GT labels)")]:
    v = [env_diff(r, a) - env_diff(r, b) for r in reports]
    mean, se, lo, hi = stats(v)
    iv, two = verdict(a, b, mean, se, lo, hi)
    print(f"{a} - {b}: {', '.join(f'{x:+.3f}' for x in v)} -> {mean:+.3f} ± {se:.3f} [{lo:+.3f}, {hi:+.3f}] interval: {iv}; 2 s.e.: {two}")
