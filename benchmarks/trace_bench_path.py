"""The way from ``ltcache.stage2.api.bench`` to the first training step, followed as data.

Run by hand:  python benchmarks/trace_bench_path.py [--method ce] [--cache DIR] [--sequence]

Runs ``bench`` (one method, one seed, one epoch, CPU, one process) on the bundled cache (or
``--cache``) with a profiler hook (``sys.setprofile``) that follows only functions defined in
``ltcache/``, until the first ``GroupTrainer.step`` is entered. A *file visit* starts whenever
the innermost running ltcache function lies in another file than before: by a call into it
(an *entry*) or by a return into it from a file below (a *return*). Prints the visits, the
entries per file, the returns into a file already left, and how often each file was entered;
``--sequence`` also lists the visits in order. Counts, not seconds: they do not depend on the
machine. Module bodies (imports on the way) are left out; ``stage2_*`` count the same visits with
every file outside ``ltcache/stage2/`` left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "ltcache") + os.sep


# what loads or inspects the cache, what looks a head up, what plans: how often each is called
LOOKS = ("_load_cache", "val_gaps", "missing_stage1", "require_stage1", "needs_val", "require_val", "get_head",
         "group_key", "frozen_base")


class PathTrace:
    """A profile hook that records the ltcache file visits until the first training step."""

    def __init__(self) -> None:
        self.stack: list[str] = []       # files of the running ltcache frames, innermost last
        self.visits: list[tuple[str, str]] = []      # (file, "call" | "return")
        self.calls: Counter = Counter()               # ltcache functions entered, by "file:qualname"
        self.reached = False
        self.importing = 0               # module bodies running (imports): not on the path

    def _rel(self, code) -> str | None:
        f = code.co_filename
        return os.path.relpath(f, ROOT) if f.startswith(PKG) else None

    def __call__(self, frame, event, arg) -> None:
        if self.reached or event not in ("call", "return"):
            return
        if frame.f_code.co_name == "<module>":
            self.importing += 1 if event == "call" else -1
            return
        rel = self._rel(frame.f_code)
        if rel is None or self.importing:
            return
        if event == "call":
            qual = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            if qual == "GroupTrainer.step":
                self.visits.append((rel, "call"))
                self.reached = True
                sys.setprofile(None)
                return
            if not self.stack or self.stack[-1] != rel:
                self.visits.append((rel, "call"))
            self.stack.append(rel)
            self.calls[f"{rel}:{qual}"] += 1
        elif self.stack:
            left = self.stack.pop()
            if self.stack and self.stack[-1] != left:
                self.visits.append((self.stack[-1], "return"))


def summary(t: PathTrace) -> dict:
    """The counts the report shows."""
    entries = Counter(f for f, kind in t.visits if kind == "call")
    back = sum(kind == "return" for _, kind in t.visits)
    inner = [f for f, _ in t.visits if f.startswith("ltcache/stage2/")]
    stage2 = [f for i, f in enumerate(inner) if i == 0 or inner[i - 1] != f]
    looks = {name: sum(n for k, n in t.calls.items() if k.split(":")[1] == name) for name in LOOKS}
    return {"reached_step": t.reached, "file_visits": len(t.visits), "files": len({f for f, _ in t.visits}),
            "returns_into_a_file_left": back,
            "calls_into": dict(entries.most_common()), "visits_per_file": dict(Counter(f for f, _ in t.visits).most_common()),
            "stage2_file_visits": len(stage2), "stage2_visits_per_file": dict(Counter(stage2).most_common()),
            "calls_of": looks}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="ce")
    ap.add_argument("--cache", default=None, help="a cache directory (default: the bundled cache)")
    ap.add_argument("--sequence", action="store_true", help="also list the visits in order")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    torch.set_num_threads(1)
    from ltcache.stage2 import api

    t = PathTrace()
    sys.setprofile(t)
    try:
        api.bench(a.cache, methods=[a.method], seeds=(0,), overrides={"epochs": 1}, device="cpu", quiet=True, jobs=1)
    finally:
        sys.setprofile(None)
    out = summary(t)
    if a.sequence:
        out["sequence"] = [f"{f} ({kind})" for f, kind in t.visits]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
