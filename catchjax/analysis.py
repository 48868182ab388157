"""The pre-registered primary analysis of the headline (issue 27 item 7) and a variance
decomposition for crossed catch x training-seed designs (issue 27 item 6).

Primary (`config.report.primary`, fixed before any headline rows exist; `PRIMARY` mirrors its
default for rebuilds of runs that saved none): the outcome (default the retained gap,
`report.retained_gap`) of arms[0] minus arms[1] (treatment - control) at N = n. Rows pair on
(family, behaviour, organism, seed): same organism, same catch, same evaluation prompts. The
statistic is the mean over families of each family's mean paired difference (every family
weighs the same). It is tested by a sign-flip permutation test stratified by family and
clustered by organism: a cluster is one organism's pairs in one family (all of its seeds), and
every pair of a cluster takes the same sign, since seeds of one organism are not independent.
Under the null (each cluster's differences symmetric about 0) every one of the 2^k sign
patterns of the k clusters is equally likely; the two-sided p is the share of patterns with
|T*| >= |T| (all 2^k when 2^k <= n_permutations, else n_permutations Monte Carlo draws from
`seed`, p = (1 + hits) / (1 + draws)). The smallest attainable p is 2 / 2^k: with one organism
per behaviour and four families it is 0.125. Its 95% interval is a family-stratified cluster
bootstrap (clusters resampled within each family, `scipy.stats.bootstrap`). Families with no
backdoor installed (`report.installed_gaps` under installed_gap_min) are left out and listed.

Then each family's own sign-flip test, Holm-corrected (`statsmodels` multipletests), and, as
exploratory, a mixed model (statsmodels MixedLM): outcome ~ treat * family (sum-coded, so the
treat coefficient is the equal-weight mean over families, the primary's estimand), a random
intercept per organism and a catch variance component within it.

`variance_components(rows)`: for one family's rows of a crossed design (several catch seeds x
training seeds x arms), catch and training seed as crossed variance components, plus the
binomial term mean p(1 - p) / n of the measured rates (the part of the residual that more
evaluation prompts would shrink).
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from catchjax import common, report

# configs/common.py's report.primary default (a test keeps the two equal).
PRIMARY = dict(outcome="retained_gap", n=16, arms=("treatment", "control"),
               test="sign_flip_permutation", n_permutations=10000, seed=0)
OUTCOMES = ("retained_gap", "retained", "deploy_rate", "test_rate")
TESTS = ("sign_flip_permutation",)
CHANGED = "PRIMARY CHANGED AFTER ROWS EXISTED"


def primary_spec(spec=None) -> dict:
  """The primary spec as a plain dict (from a ConfigDict, a dict or None: the default)."""
  if spec is None:
    spec = PRIMARY
  d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  d["arms"] = tuple(d["arms"])
  return d


def primary_hash(spec=None) -> str:
  s = primary_spec(spec)
  return common.config_hash({**s, "arms": list(s["arms"])})


def outcome(row: dict, name: str) -> float | None:
  v = report.retained_gap(row) if name == "retained_gap" else row.get(name)
  return None if v is None or not np.isfinite(v) else float(v)


def not_installed(rows: list[dict], meta: dict) -> set[tuple[str, str]]:
  """(family, behaviour) whose organism has no backdoor installed (report card gap under
  installed_gap_min); unknown gaps count as installed."""
  gap_min = float(meta.get("installed_gap_min", report.INSTALLED_GAP_MIN))
  return {k for k, g in report.installed_gaps(rows, meta).items() if g < gap_min}


def pair_rows(rows: list[dict], spec, excluded=frozenset()) -> tuple[list[dict], int]:
  """Paired arms[0] - arms[1] outcome differences at N = spec n: ([pair], rows left unpaired
  or without an outcome). Rows of (family, behaviour) in `excluded` are left out."""
  spec = primary_spec(spec)
  a, b = spec["arms"]
  cells = {}
  for r in rows:
    if (r.get("arm") not in (a, b) or r.get("n") != spec["n"]
        or r.get("experiment", "headline") != "headline"
        or (r.get("family"), r.get("behaviour")) in excluded):
      continue
    k = (r["family"], r["behaviour"], r.get("organism"), (r["seed"], r.get("catch")), r["arm"])
    if k in cells:
      raise ValueError(f"analysis: two rows for cell {k}; pass one sweep's rows (or pool them "
                       f"with report.pool_rows).")
    cells[k] = r
  pairs, unpaired = [], 0
  for k, ra in cells.items():
    if k[-1] != a:
      continue
    rb = cells.get(k[:-1] + (b,))
    ya, yb = outcome(ra, spec["outcome"]), None if rb is None else outcome(rb, spec["outcome"])
    if ya is None or yb is None:
      unpaired += 1 + (rb is not None)
      continue
    pairs.append(dict(family=k[0], behaviour=k[1], organism=k[2], seed=k[3][0],
                      catch_seed=ra.get("catch_seed"), diff=ya - yb, a=ya, b=yb))
  unpaired += sum(1 for k in cells if k[-1] == b and k[:-1] + (a,) not in cells)
  return pairs, unpaired


def _clusters(pairs: list[dict]):
  """Per cluster (family, behaviour, organism): its family, difference sum and pair count."""
  sums, counts = defaultdict(float), defaultdict(int)
  for p in pairs:
    k = (p["family"], p["behaviour"], p["organism"])
    sums[k] += p["diff"]
    counts[k] += 1
  keys = sorted(sums, key=str)
  return ([k[0] for k in keys], np.array([sums[k] for k in keys]),
          np.array([counts[k] for k in keys], dtype=np.float64))


def _weights(fams, sums, counts) -> np.ndarray:
  """T(signs) = signs @ w: each cluster's sum over its family's pair count and the number of
  families (the mean over families of the families' mean paired differences)."""
  fam_n = defaultdict(float)
  for f, c in zip(fams, counts):
    fam_n[f] += c
  return sums / (np.array([fam_n[f] for f in fams]) * len(fam_n))


def sign_flip_test(pairs: list[dict], n_permutations: int = 10000, seed: int = 0) -> dict:
  """The family-stratified, organism-clustered sign-flip test of the paired differences (see
  the module doc): estimate, two-sided p, exact or Monte Carlo, smallest attainable p."""
  fams, sums, counts = _clusters(pairs)
  k = len(fams)
  out = dict(pairs=len(pairs), clusters=k, families=len(set(fams)))
  if k == 0:
    return dict(out, estimate=float("nan"), p=float("nan"), exact=True, p_min=float("nan"),
                draws=0)
  w = _weights(fams, sums, counts)
  t = float(w.sum())
  tol = 1e-9 * max(1.0, abs(t))
  if 2 ** k <= n_permutations:
    signs = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1) * 2 - 1
    p = float(np.mean(np.abs(signs @ w) >= abs(t) - tol))
    return dict(out, estimate=t, p=p, exact=True, p_min=min(1.0, 2.0 / 2 ** k),
                draws=2 ** k)
  rng = np.random.default_rng(seed)
  hits, left = 0, int(n_permutations)
  while left:
    b = min(left, 1000)
    signs = rng.integers(0, 2, size=(b, k)) * 2 - 1
    hits += int(np.sum(np.abs(signs @ w) >= abs(t) - tol))
    left -= b
  return dict(out, estimate=t, p=(1 + hits) / (1 + n_permutations), exact=False,
              p_min=1.0 / (1 + n_permutations), draws=int(n_permutations))


def cluster_bootstrap_ci(pairs: list[dict], n_boot: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> tuple[float | None, float | None, str]:
  """Percentile (1 - alpha) interval of the primary statistic from resampling clusters with
  replacement within each family (scipy.stats.bootstrap, one sample per family): (lo, hi,
  how). A family with one cluster has no between-cluster spread and enters as a constant;
  with none that has two, there is no interval (None, None, why)."""
  from scipy import stats as sps
  fams, sums, counts = _clusters(pairs)
  by_fam = defaultdict(list)
  for i, f in enumerate(fams):
    by_fam[f].append(i)
  fixed = [np.array(ix) for ix in by_fam.values() if len(ix) < 2]
  free = [np.array(ix) for ix in by_fam.values() if len(ix) >= 2]
  if not free:
    return None, None, "no interval: every family has one organism cluster"
  const = sum(sums[ix].sum() / counts[ix].sum() for ix in fixed)

  def stat(*samples, axis=-1):
    tot = const
    for ix, s in zip(free, samples):
      j = ix[np.asarray(s).astype(int)]
      tot = tot + sums[j].sum(axis=-1) / counts[j].sum(axis=-1)
    return tot / len(by_fam)

  data = [np.arange(len(ix)) for ix in free]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # a degenerate (constant) resample distribution
    res = sps.bootstrap(data, stat, n_resamples=int(n_boot), confidence_level=1.0 - alpha,
                        method="percentile", vectorized=True, axis=-1,
                        rng=np.random.default_rng(seed))
  lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
  if not (np.isfinite(lo) and np.isfinite(hi)):
    est = float(stat(*data))
    lo, hi = est, est
  few = min(len(ix) for ix in free) < 5
  return lo, hi, (f"family-stratified cluster bootstrap, {n_boot} resamples"
                  + (f"; {len(fixed)} one-cluster families held fixed" if fixed else "")
                  + ("; under 5 clusters in a family: too narrow" if few else ""))


def primary(rows: list[dict], meta: dict, spec=None) -> dict:
  """The primary contrast on `rows` (see the module doc)."""
  spec = primary_spec(spec)
  gone = not_installed(rows, meta)
  pairs, unpaired = pair_rows(rows, spec, gone)
  test = sign_flip_test(pairs, spec["n_permutations"], spec["seed"])
  lo, hi, how = cluster_bootstrap_ci(pairs, seed=spec["seed"])
  seen = {(r.get("family"), r.get("behaviour")) for r in rows
          if r.get("arm") in spec["arms"] and r.get("n") == spec["n"]}
  return dict(test, spec=spec, lo=lo, hi=hi, ci=how, unpaired=unpaired,
              excluded=sorted(seen & gone), pair_list=pairs,
              family_names=sorted({p["family"] for p in pairs}),
              organisms=len({(p["behaviour"], p["organism"]) for p in pairs}))


def per_family(pairs: list[dict], spec=None, alpha: float = 0.05) -> list[dict]:
  """Each family's own sign-flip test (clusters = its organisms), Holm-corrected over the
  families (statsmodels multipletests, method='holm')."""
  from statsmodels.stats.multitest import multipletests
  spec = primary_spec(spec)
  fams = sorted({p["family"] for p in pairs})
  out = [dict(family=f, **sign_flip_test([p for p in pairs if p["family"] == f],
                                          spec["n_permutations"], spec["seed"]))
         for f in fams]
  if out:
    reject, adj, _, _ = multipletests([o["p"] for o in out], alpha=alpha, method="holm")
    for o, r, q in zip(out, reject, adj):
      o.update(p_holm=float(q), reject=bool(r))
  return out


def _mixed_frame(rows: list[dict], meta: dict, spec):
  import pandas as pd
  spec = primary_spec(spec)
  gone = not_installed(rows, meta)
  recs = []
  for r in rows:
    y = outcome(r, spec["outcome"])
    if (r.get("arm") in spec["arms"] and r.get("n") == spec["n"] and y is not None
        and r.get("experiment", "headline") == "headline"
        and (r.get("family"), r.get("behaviour")) not in gone):
      recs.append(dict(y=y, treat=float(r["arm"] == spec["arms"][0]), family=r["family"],
                       organism=f"{r['behaviour']}/{r.get('organism')}",
                       catch=str(r.get("catch_seed"))))
  return pd.DataFrame(recs)


def mixed_model(rows: list[dict], meta: dict, spec=None) -> dict:
  """Exploratory: MixedLM outcome ~ treat * C(family, Sum), random intercept per organism,
  catch (catch_seed) as a variance component within it. The treat coefficient (with its 95%
  CI) is the equal-weight mean over families of the arm difference. {'error': why} when the
  fit fails or does not converge."""
  import statsmodels.formula.api as smf
  df = _mixed_frame(rows, meta, spec)
  if len(df) < 4 or df["treat"].nunique() < 2:
    return dict(error="too few rows for a mixed model")
  formula = "y ~ treat * C(family, Sum)" if df["family"].nunique() > 1 else "y ~ treat"
  vc = {"catch": "0 + C(catch)"} if df["catch"].nunique() > 1 else None
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      fit = smf.mixedlm(formula, df, groups=df["organism"], re_formula="1",
                        vc_formula=vc).fit(reml=True)
    if not fit.converged:
      raise RuntimeError("optimizer did not converge")
    singular = [str(w.message) for w in caught if "not positive definite" in str(w.message)]
    if singular:   # a singular fit: its standard errors and CIs mean nothing
      raise RuntimeError(singular[0].splitlines()[0])
    ci = fit.conf_int().loc["treat"]
    out = dict(coef=float(fit.params["treat"]), lo=float(ci.iloc[0]), hi=float(ci.iloc[1]),
               p=float(fit.pvalues["treat"]), organism_var=float(fit.cov_re.iloc[0, 0]),
               catch_var=float(fit.vcomp[0]) if vc else None, residual_var=float(fit.scale),
               formula=formula, rows=len(df), organisms=int(df["organism"].nunique()))
  except Exception as e:   # singular designs (one organism, confounded catches), bad fits
    return dict(error=f"mixed model did not converge: {type(e).__name__}: {e}")
  if not all(np.isfinite(out[k]) for k in ("coef", "lo", "hi")):
    return dict(error="mixed model did not converge: non-finite arm coefficient or CI")
  notes = sorted({str(w.message).splitlines()[0] for w in caught})
  if out["organisms"] < 5:
    notes.insert(0, f"only {out['organisms']} organism(s): the organism variance is poorly "
                    f"estimated (it needs several organisms; read it as unknown)")
  return dict(out, notes=notes)


def variance_components(rows: list[dict], outcome_key: str = "deploy_rate",
                        n_key: str | None = "deploy_n", catch_key: str = "catch_seed",
                        train_key: str = "seed") -> dict:
  """Crossed catch x training-seed decomposition of one family's rows (issue 27 item 6):
  MixedLM with one group, no group intercept and catch and training seed as variance
  components (arm fixed), REML. Returns catch_var, train_var, residual_var, binomial_var (mean
  p(1 - p) / n of the measured rates, part of the residual) and counts, or {'error': why}."""
  import pandas as pd
  import statsmodels.api as sm
  fams = {r.get("family") for r in rows}
  if len(fams) > 1:
    raise ValueError(f"variance_components: rows of one family, got {sorted(fams, key=str)}")
  df = pd.DataFrame([dict(y=float(r[outcome_key]), arm=str(r.get("arm")),
                          catch=str(r[catch_key]), train=str(r[train_key]), one=1,
                          n=r.get(n_key) if n_key else None)
                     for r in rows if r.get(outcome_key) is not None])
  nc, nt = (df["catch"].nunique(), df["train"].nunique()) if len(df) else (0, 0)
  if nc < 2 or nt < 2:
    return dict(error=f"needs >= 2 catch seeds and >= 2 training seeds (got {nc}, {nt})")
  if df.groupby(["catch", "train"]).ngroups <= max(nc, nt):
    return dict(error="catch and training seed are confounded (each training seed has its "
                      "own catch); vary them crossed to separate them")
  fixed = "y ~ C(arm)" if df["arm"].nunique() > 1 else "y ~ 1"
  vc = {"catch": "0 + C(catch)", "train": "0 + C(train)"}
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # the (absent) group intercept sits on the boundary
      fit = sm.MixedLM.from_formula(fixed, groups="one", re_formula="0", vc_formula=vc,
                                    data=df).fit(reml=True)
    if not fit.converged:
      raise RuntimeError("optimizer did not converge")
  except Exception as e:
    return dict(error=f"mixed model did not converge: {type(e).__name__}: {e}")
  comp = dict(zip(fit.model.exog_vc.names, np.asarray(fit.vcomp, dtype=float)))
  nn = df["n"].astype(float)
  binom = float(np.mean(df["y"] * (1 - df["y"]) / nn)) if nn.notna().all() else None
  return dict(catch_var=float(comp["catch"]), train_var=float(comp["train"]),
              residual_var=float(fit.scale), binomial_var=binom, rows=len(df), catches=nc,
              train_seeds=nt, arms=int(df["arm"].nunique()))


def primary_meta(rows: list[dict], spec, prior: dict | None = None,
                 commit: str | None = None) -> dict:
  """Report-header fields recording the primary: primary (the spec), primary_hash and
  primary_commit, the commit of the first row that ran under this spec (or `commit`). A
  `prior` header that already records a primary keeps its hash and commit (the first record
  wins, so a later change of spec shows up as a mismatch)."""
  spec, prior = primary_spec(spec), prior or {}
  h = primary_hash(spec)
  if prior.get("primary_hash"):
    h, first = prior["primary_hash"], prior.get("primary_commit")
  else:
    first = next((r.get("commit") for r in rows if r.get("primary_hash") == h), commit)
  return dict(primary={**spec, "arms": list(spec["arms"])}, primary_hash=h,
              primary_commit=first)


def provenance(rows: list[dict], meta: dict, spec) -> dict:
  """Which primary the rows were made under: hash (this spec's), commit (that set it),
  changed (True when a row or the header recorded another spec), recorded (whether anything
  recorded one at all)."""
  h = primary_hash(spec)
  spec = primary_spec(spec)
  seen = [r.get("primary_hash") for r in rows if r.get("arm") in spec["arms"]
          and r.get("primary_hash")]
  if meta.get("primary_hash"):
    seen.append(meta["primary_hash"])
  commit = meta.get("primary_commit") if meta.get("primary_hash") == h else None
  commit = commit or next((r.get("commit") for r in rows if r.get("primary_hash") == h), None)
  return dict(hash=h, commit=commit, changed=any(x != h for x in seen), recorded=bool(seen),
              others=sorted({x for x in seen if x != h}))


def _p(x: float) -> str:
  return "n/a" if x is None or not np.isfinite(x) else (f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}")


def _primary_lines(res: dict, prov: dict) -> list[str]:
  s = res["spec"]
  how = (f"exact over all {res['draws']} sign patterns" if res["exact"] else
         f"Monte Carlo, {res['draws']} sign draws, seed {s['seed']}")
  ci = (f"[{res['lo']:+.3f}, {res['hi']:+.3f}] ({res['ci']})" if res["lo"] is not None
        else f"none ({res['ci']})")
  lines = ["## Primary analysis (pre-registered)", ""]
  if prov["changed"]:
    lines += [f"**{CHANGED}**: the rows (or this report's header) were made under primary "
              f"spec {', '.join(prov['others'])}, not this one ({prov['hash']}). The test "
              f"below is not the pre-registered one.", ""]
  lines += [
      f"- **Outcome**: {s['outcome']} at N = {s['n']}",
      f"- **Contrast**: {s['arms'][0]} - {s['arms'][1]}, paired on (family, behaviour, "
      f"organism, seed); statistic: mean over families of the family's mean paired difference",
      f"- **Test**: {s['test']}, two-sided, stratified by family, clustered by organism (one "
      f"sign per organism per family); {how}",
      f"- **Estimate**: {res['estimate']:+.3f}, 95% CI {ci}",
      f"- **p** = {_p(res['p'])} (smallest attainable: {_p(res['p_min'])}"
      + ("; this design cannot reach p < 0.05: that needs >= 6 organism-family clusters)"
         if res["p_min"] >= 0.05 else ")"),
      f"- **Pairs / clusters / families**: {res['pairs']} / {res['clusters']} / "
      f"{res['families']} ({', '.join(res['family_names']) or 'none'}); {res['organisms']} "
      f"organism(s); rows left unpaired or without an outcome: {res['unpaired']}",
      "- **Excluded (no backdoor installed)**: "
      + (", ".join(f"{f} ({b})" for f, b in res["excluded"]) or "none"),
      f"- **Primary spec**: {prov['hash']}, set at commit "
      + (prov["commit"] or "unrecorded (the rows carry no primary_hash: made before the "
                           "primary was recorded, so its pre-registration cannot be checked)")]
  return lines


def _family_lines(fams: list[dict]) -> list[str]:
  lines = ["", "### Per-family tests (Holm-corrected over families)", "",
           "| family | pairs | clusters | estimate | p | smallest attainable p | Holm p | "
           "reject at 0.05 |", "|---|---|---|---|---|---|---|---|"]
  for f in fams:
    lines.append(f"| {f['family']} | {f['pairs']} | {f['clusters']} | {f['estimate']:+.3f} | "
                 f"{_p(f['p'])} | {_p(f['p_min'])} | {_p(f['p_holm'])} | "
                 f"{'yes' if f['reject'] else 'no'} |")
  return lines


def _mixed_lines(mm: dict) -> list[str]:
  lines = ["", "### Exploratory: mixed model", ""]
  if "error" in mm:
    return lines + [mm["error"]]
  cv = "n/a" if mm["catch_var"] is None else f"{mm['catch_var']:.4f}"
  lines += [f"MixedLM `{mm['formula']}`, random intercept per organism, catch variance "
            f"component ({mm['rows']} rows, {mm['organisms']} organism(s)).", "",
            f"- treat coefficient (equal-weight mean over families): {mm['coef']:+.3f}, 95% CI "
            f"[{mm['lo']:+.3f}, {mm['hi']:+.3f}], p = {_p(mm['p'])}",
            f"- variance components: organism {mm['organism_var']:.4f}, catch {cv}, "
            f"residual {mm['residual_var']:.4f}"]
  return lines + [f"- note: {n}" for n in mm["notes"]]


def crossed_markdown(rows: list[dict], n: int) -> str:
  """Exploratory: each family's crossed catch x training-seed decomposition (rows that carry
  a `catch`, the :crossed design) at N = n, for the deployment rate after and the retained
  gap; '' when no row is crossed."""
  crossed = [r for r in rows if r.get("catch") is not None and r.get("n") == n
             and r.get("arm") in ("treatment", "control")]
  if not crossed:
    return ""
  lines = ["", f"### Exploratory: variance decomposition of the crossed design (N = {n})", "",
           "MixedLM (REML), arm fixed, catch seed and training seed crossed variance "
           "components; binomial: mean p(1 - p) / n of the measured rates (part of the "
           "residual).", "",
           "| family | outcome | rows | catches x training seeds | catch var | training-seed "
           "var | residual var | binomial var |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "n/a" if v is None else f"{v:.4f}"   # noqa: E731
  for fam in sorted({r["family"] for r in crossed}):
    fr = [r for r in crossed if r["family"] == fam]
    gap_rows = [dict(r, retained_gap=report.retained_gap(r)) for r in fr]
    for label, rs, key, nk in (("deployment rate after", fr, "deploy_rate", "deploy_n"),
                               ("retained gap", gap_rows, "retained_gap", None)):
      vc = variance_components(rs, outcome_key=key, n_key=nk)
      if "error" in vc:
        lines.append(f"| {fam} | {label} | {len(rs)} | | {vc['error']} | | | |")
        continue
      lines.append(f"| {fam} | {label} | {vc['rows']} | {vc['catches']} x {vc['train_seeds']}"
                   f" | {fmt(vc['catch_var'])} | {fmt(vc['train_var'])} | "
                   f"{fmt(vc['residual_var'])} | {fmt(vc['binomial_var'])} |")
  return "\n".join(lines) + "\n"


def _spec_from(config_report, meta: dict) -> dict:
  spec = None if config_report is None else config_report.get("primary")
  return primary_spec(spec if spec is not None else meta.get("primary"))


def primary_markdown(rows: list[dict], meta: dict, config_report=None) -> str:
  """The report's primary section: the pre-registered primary first (outcome, contrast, test,
  estimate, CI, p, pairs / clusters / families, exclusions, the commit that set it, a flag when
  it changed after rows existed), then the Holm-corrected per-family tests, then the
  exploratory mixed model. `config_report`: config.report (or a dict) holding `primary`;
  None: the header's recorded primary, else PRIMARY."""
  spec = _spec_from(config_report, meta)
  res = primary(rows, meta, spec)
  lines = _primary_lines(res, provenance(rows, meta, spec))
  lines += _family_lines(per_family(res["pair_list"], spec))
  lines += ["", "## Exploratory", "",
            "Exploratory: everything below, and every other table and figure of this report, "
            "is not the pre-registered test (no multiplicity control)."]
  lines += _mixed_lines(mixed_model(rows, meta, spec))
  return "\n".join(lines) + "\n"


def report_section(rows: list[dict], meta: dict, config_report=None) -> str:
  """primary_markdown for report.md, guarded: '' when the rows hold no pair of the primary's
  arms at its N (e.g. another experiment, or a sweep without the control arm), a one-line
  note when the analysis fails, so the rest of the report always builds."""
  try:
    crossed = "".join(crossed_markdown(rows, n) for n in sorted(
        {r["n"] for r in rows if r.get("catch") is not None}))
  except Exception as e:   # nor the crossed design's decomposition
    crossed = f"\nvariance decomposition of the crossed design failed: {e!r}\n"
  try:
    if not pair_rows(rows, _spec_from(config_report, meta))[0]:
      return crossed
    return primary_markdown(rows, meta, config_report) + crossed
  except Exception as e:   # the primary must never stop the report
    return (f"## Primary analysis (pre-registered)\n\nprimary analysis failed: {e!r}\n"
            + crossed)
