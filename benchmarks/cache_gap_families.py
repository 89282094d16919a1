"""The cache-vs-backbone gap per method family: one command, every family x seeds, per-class gaps.

For one method of each family (instance-sampled CE and LOS, class-balanced cRT and MiSLAS,
balanced softmax, the frozen-base heads LWS and MARC) it trains the method at its preset twice
per seed -- on the cache (``ltcache retrain --cache``) and through the frozen stage-1 backbone on
freshly augmented images (``ltcache retrain --through-backbone``) -- with BatchNorm in the mode the
method's source uses in stage 2 (``BN_MODE``), and writes, per family, All on each path (mean and
population std over seeds), their gap, and every class whose gap (cache mean - backbone mean)
lies beyond the backbone path's own per-class seed spread (max - min over seeds).

    PYTHONPATH=$PWD python benchmarks/cache_gap_families.py --out runs/gap-families \\
        [--ckpt ltcache/assets/default_cache/stage1.pt] [--cache ltcache/assets/default_cache] \\
        [--data-root DIR] [--methods ce,los,...] [--seeds 0,1,2] [--device cuda]

Each (method, path) writes ``OUT/<method>.<cache|backbone>.json`` (the results JSON of
``retrain``) as soon as it finishes; a re-run skips the files already there, so an interrupted
measurement resumes. ``OUT/gaps.md`` and ``OUT/gaps.json`` are rewritten at the end from every
pair present.

Closed forms (tau-norm, post-hoc LA, NCM) have no training: both paths apply the same layer to
the same eval-mode test features, so their gap is zero by construction and they are not run.

The cache path trains each method on the features its registry entry chooses (the cache's main
features, or its feature set where the source keeps BatchNorm in another mode, e.g. MiSLAS's
``bn-eval`` at K = 10); the table's ``cache features`` column says which.

Cost: the backbone path re-runs the backbone every step (ResNet-32, CIFAR-10-LT IR 100: about
75 s for 3 seeds of LOS on an H100; tens of minutes per method on a 2-core CPU). Results into
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from pathlib import Path
from typing import Optional, Sequence

FAMILIES = {
    "ce": "instance-sampled (LOS loop, delta 0)",
    "los": "instance-sampled",
    "crt": "class-balanced",
    "mislas": "class-balanced",
    "balanced-softmax": "logit-adjusted",
    "lws": "frozen base",
    "marc": "frozen base",
}
# BatchNorm in stage 2 as each source's script sets it: model.train() (batch statistics,
# running statistics drift) in LOS, cRT / BagofTricks (LWS), BALMS; MiSLAS follows its config's
# shift_bn: False in the CIFAR-10 configs (model.eval()), True in CIFAR-100 / ImageNet. MARC's
# code is not public at a known commit: train, the common case (UNVERIFIED).
BN_MODE = {"ce": "train", "los": "train", "crt": "train", "balanced-softmax": "train", "lws": "train",
           "marc": "train", "mislas": {10: "eval", "default": "train"}}


def bn_mode(method: str, num_classes: int) -> str:
    """``train`` or ``eval``: the BatchNorm mode of ``method``'s source at K = ``num_classes``."""
    mode = BN_MODE.get(method, "train")
    if isinstance(mode, dict):
        mode = mode.get(num_classes, mode["default"])
    return mode


def _per_seed(results: dict) -> tuple[list[float], list[list[float]]]:
    """All and per-class accuracy (percent) of every run of a results JSON."""
    runs = results["runs"]
    return [float(r["metrics"]["all"]) for r in runs], [list(map(float, r["metrics"]["per_class_acc"])) for r in runs]


def family_gap(cache_res: dict, backbone_res: dict, class_names: Optional[Sequence[str]] = None) -> dict:
    """The gap of one method: All on each path (mean, population std over seeds), All's gap, and per
    class the gap of the seed means beside the backbone path's seed spread (max - min); ``beyond``
    lists the classes whose |gap| exceeds that spread."""
    a_all, a_pc = _per_seed(cache_res)
    b_all, b_pc = _per_seed(backbone_res)
    k = len(b_pc[0])
    names = list(class_names or [str(j) for j in range(k)])
    per_class = []
    for j in range(k):
        a = [pc[j] for pc in a_pc]
        b = [pc[j] for pc in b_pc]
        gap = st.mean(a) - st.mean(b)
        spread = max(b) - min(b)
        per_class.append({"class": names[j], "cache": st.mean(a), "backbone": st.mean(b), "gap": gap,
                          "backbone_spread": spread, "beyond": abs(gap) > spread})
    return {"cache_all": st.mean(a_all), "cache_std": st.pstdev(a_all), "backbone_all": st.mean(b_all),
            "backbone_std": st.pstdev(b_all), "all_gap": st.mean(a_all) - st.mean(b_all),
            "seeds": [len(a_all), len(b_all)], "per_class": per_class,
            "beyond": [c["class"] for c in per_class if c["beyond"]]}


def gaps_markdown(gaps: dict) -> str:
    """The per-family table (All on both paths, the gap, the classes beyond the backbone's spread)."""
    lines = ["| method | family | BN | cache features | cache All | backbone All | gap | classes beyond the backbone's "
             "seed spread (gap / spread) |", "|---|---|---|---|---|---|---|---|"]
    for m, g in gaps.items():
        beyond = ", ".join(f"{c['class']} {c['gap']:+.1f} / {c['backbone_spread']:.1f}"
                           for c in g["per_class"] if c["beyond"]) or "none"
        lines.append(f"| {m} | {FAMILIES.get(m, '')} | {g.get('bn', '')} | {g.get('features', 'main')} | "
                     f"{g['cache_all']:.2f} ± {g['cache_std']:.2f} | "
                     f"{g['backbone_all']:.2f} ± {g['backbone_std']:.2f} | {g['all_gap']:+.2f} | {beyond} |")
    return "\n".join(lines) + "\n"


def run(out: Path, ckpt: Path, cache: Path, methods: Sequence[str], seeds: Sequence[int], data_root=None,
        device: str = "auto", overrides: Optional[dict] = None, quiet: bool = False) -> dict:
    """Train what is missing under ``out``, then write gaps.md / gaps.json from every pair; returns the gaps."""
    from ltcache.outputs import atomic_write
    from ltcache.stage2 import api
    from ltcache.stage2.results import write_json
    from ltcache.through_backbone import retrain_through_backbone

    out.mkdir(parents=True, exist_ok=True)
    gaps = {}
    for m in methods:
        paths = {p: out / f"{m}.{p}.json" for p in ("cache", "backbone")}
        if not paths["cache"].exists():
            res = api.retrain(str(cache), m, overrides, seeds=seeds, device=device, quiet=quiet)
            write_json(res, paths["cache"])
        num_classes = len(json.loads(paths["cache"].read_text())["runs"][0]["metrics"]["per_class_acc"])
        mode = bn_mode(m, num_classes)
        if not paths["backbone"].exists():
            res = retrain_through_backbone(ckpt, m, overrides, seeds=seeds, train_bn=(mode == "train"),
                                           device=device, data_root=data_root, quiet=quiet)
            write_json(res, paths["backbone"])
        a, b = (json.loads(paths[p].read_text()) for p in ("cache", "backbone"))
        names = (a.get("cache") or {}).get("class_names")
        gaps[m] = dict(family_gap(a, b, names), bn=mode, features=(a.get("feature_sets") or {}).get(m, "main"))
    for name, text in (("gaps.json", json.dumps(gaps, indent=1)), ("gaps.md", gaps_markdown(gaps))):
        with atomic_write(out / name) as fh:
            fh.write(text)
    return gaps


def main(argv: Optional[Sequence[str]] = None) -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the results JSONs and gaps.md / gaps.json")
    ap.add_argument("--ckpt", type=Path, default=root / "ltcache/assets/default_cache/stage1.pt")
    ap.add_argument("--cache", type=Path, default=root / "ltcache/assets/default_cache")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--methods", default=",".join(FAMILIES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from ltcache.errors import LtcacheError
    try:
        gaps = run(args.out, args.ckpt, args.cache, [m for m in args.methods.split(",") if m],
                   [int(s) for s in args.seeds.split(",")], args.data_root, args.device, quiet=args.quiet)
    except LtcacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(gaps_markdown(gaps), end="")


if __name__ == "__main__":
    main()
