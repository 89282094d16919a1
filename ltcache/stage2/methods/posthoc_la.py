"""``posthoc-la``: post-hoc logit adjustment of the stage-1 head, a closed form (docs/methods.md#posthoc-la)."""
from __future__ import annotations

from ltcache.stage2.methods import CLOSED_FORM_GAP, Param, Space, register_method

TAU_POSTHOC = Param("tau", float, lo=0, default=1.0, help="post-hoc logit adjustment tau")
# Menon et al.'s tau = 1; on the bundled CIFAR-10-LT cache the val pick sat on the top of 0..2, so
# its candidates reach 3 (0.1 steps; a --budget below 31 spreads them evenly)
LA_TAU_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(31))

register_method("posthoc-la", head="posthoc-la", loss="-", closed_form=True, params=(TAU_POSTHOC,),
                source="google-research logit_adjustment (docs/methods.md#posthoc-la)",
                notes="z - tau log pi on the stage-1 head",
                space=Space(candidates={"tau": LA_TAU_CANDIDATES}),
                feature_sets={"*": "bn-eval"}, cache_gap=CLOSED_FORM_GAP)
