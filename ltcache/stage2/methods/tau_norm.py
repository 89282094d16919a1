"""``tau-norm``: the stage-1 weights divided by their norm to the power tau, a closed form
(docs/methods.md#tau-norm)."""
from __future__ import annotations

from ltcache.stage2.closed_form import TAU_GRID
from ltcache.stage2.methods import CLOSED_FORM_GAP, Param, Space, register_method

TAU_NORM = Param("tau", float, lo=0, help="tau-norm exponent, chosen on val unless given")

register_method("tau-norm", head="tau-norm", loss="-", closed_form=True, params=(TAU_NORM,),
                presets={"tau": None}, source="cRT tau_norm.py (docs/methods.md#tau-norm)",
                notes="from the stage-1 weights, bias dropped (cRT); tau from linspace(0,2,21) chosen on val unless --tau",
                space=Space(candidates={"tau": TAU_GRID}),
                feature_sets={"*": "bn-eval"}, cache_gap=CLOSED_FORM_GAP)
