"""The `evidence` strings: for each example, the numbers behind each cause that fired."""
from __future__ import annotations

import numpy as np

from . import causes


def _name(names, c) -> str:
    if c is None or c != c:  # a missing prediction (NaN)
        return "?"
    c = int(c)
    return names[c] if 0 <= c < len(names) else str(c)


def _people(i: int, x) -> str:
    """'; people: 90% say cat (10% dog, the given label)' from --soft-labels, '' without a
    human row for the example."""
    h = x.get("human")
    if h is None or h[0][i] < 0:
        return ""
    maj, p_maj, p_given = h[0][i], h[1][i], h[2][i]
    txt = f"; people: {p_maj:.0%} say {_name(x['names'], maj)}"
    if maj != x["y"][i]:
        txt += f" ({p_given:.0%} {_name(x['names'], x['y'][i])}, the given label)"
    return txt


def _one(i: int, cause: str, out, x) -> str:
    text = _one_cause(i, cause, out, x)
    return text + _people(i, x) if cause in HUMAN_CAUSES and text else text


HUMAN_CAUSES = ("label_error", "ambiguous", "model_error")  # the rules the human vote feeds


def _one_cause(i: int, cause: str, out, x) -> str:
    names, y, k = x["names"], x["y"], x["k"]
    given = _name(names, y[i])
    if cause == "label_error":
        alt = _name(names, out["dx_alt_class"].iat[i])
        who = [s for s, v in x["sig"].items() if v[i] == out["dx_alt_class"].iat[i]]
        lq = x["label_quality"]
        lq_txt = f" (label quality {lq.iat[i]:.3g})" if lq is not None else ""
        return (f"label_error: {'+'.join(who)} say {alt} ({out['dx_votes_for'].iat[i]} of "
                f"{out['dx_votes_avail'].iat[i]} signals, none for {given}); cleanlab "
                f"candidate{lq_txt}")
    if cause == "ambiguous":
        a, b = _name(names, x["c1"][i]), _name(names, x["c2"][i])
        return (f"ambiguous: {a} {x['p1'][i]:.2f} vs {b} {x['p2'][i]:.2f}; neighbours "
                f"{a} {x['n1'][i]}, {b} {x['n2'][i]} of {k}")
    if cause == "atypical":
        return (f"atypical: denser than only {out['dx_density_pct'].iat[i]:.1%} of {given}'s "
                f"train examples (cut {x['cfg'].atypical_quantile:.0%})")
    if cause == "model_error":
        own = int((x["nb"][i] == y[i]).sum())
        return (f"model_error: {x['primary']} predicts {_name(names, x['pred'][i])} but "
                f"{own}/{k} neighbours and {out['dx_votes_against'].iat[i]} of "
                f"{out['dx_votes_avail'].iat[i]} signals say {given}")
    if cause == "fragile":
        row = x["flips"][i]
        hit = [n.removeprefix("flip_severity_") for n, v in zip(x["flip_names"], row)
               if v <= x["mildest"]]
        return (f"fragile: right when clean, flips at severity {x['mildest']} under "
                f"{', '.join(hit[:4])}{' …' if len(hit) > 4 else ''}")
    if cause == "low_quality":
        return "low_quality: " + _quality_text(i, out, x["limits"])
    return ""


def _quality_text(i, out, limits) -> str:
    from ...scoring.image_quality import ISSUES
    parts = []
    for issue in str(out["iq_flags"].iat[i]).split(","):
        if issue in ISSUES:
            stat, side = ISSUES[issue]
            v = out[f"iq_{stat}"].iat[i]
            lo, hi = limits[stat]
            cut = f"< {lo:.3g}" if v < lo else f"> {hi:.3g}"
            parts.append(f"{issue} ({stat} {v:.3g} {cut}, train fence)")
    return "; ".join(parts)


def evidence_strings(out, x) -> np.ndarray:
    """(N,) strings: the primary cause's evidence first, then the other causes that fired."""
    res = np.empty(len(out), dtype=object)
    flags = {c: out[f"cause_{c}"].to_numpy(bool) for c in causes.CAUSES}
    modes = out["failure_mode"].to_numpy()
    for i in range(len(out)):
        order = [modes[i]] + [c for c in causes.CAUSES if c != modes[i]]
        parts = [_one(i, c, out, x) for c in order if c in flags and flags[c][i]]
        if modes[i] in ("correct", "unknown"):
            pt = f"{x['primary']} predicts {_name(x['names'], x['pred'][i])}"
            head = ("correct: " + pt if modes[i] == "correct" else
                    f"unknown: {pt}, given {_name(x['names'], x['y'][i])}; no rule explains it "
                    f"({out['dx_votes_for'].iat[i]} of {out['dx_votes_avail'].iat[i]} signals "
                    "for another class)")
            parts = [head] + parts
        res[i] = "; ".join(p for p in parts if p)
    return res
