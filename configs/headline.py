"""The headline experiment (the main job): catch -> train against -> measure retained
misalignment vs distinguishability, for every trigger family.

  python -m catchjax.main --config=configs/headline.py          # CPU default
  python -m catchjax.main --config=configs/headline.py:full     # accelerator budget
  python -m catchjax.main --config=configs/headline.py:tiny     # seconds-long pipeline check
  python -m catchjax.main --config=configs/headline.py:matched  # + a composition-matched control
  python -m catchjax.main --config=configs/headline.py:propensity  # + a propensity-matched one
  python -m catchjax.main --config=configs/headline.py:reseeded    # N = 16 over 6 seeds
  python -m catchjax.main --config=configs/headline.py:bounds      # + oracle and disruption arms
  python -m catchjax.main --config=configs/headline.py:pilot       # train-against pilot seeds
  python -m catchjax.main --config=configs/headline.py:curves      # removal vs training step
  python -m catchjax.main --config=configs/headline.py:distinguish # distinguishability only
  python -m catchjax.main --config=configs/headline.py:graded      # collusion at 3 subtleties
  python -m catchjax.main --config=configs/headline.py:dpo_pilot   # DPO's beta, on pilot seeds
"""
import ml_collections

from configs.common import add_stage_sections, base_config, check_variant


# --config=configs/headline.py:<variant>; none: the default (any other variant is refused)
VARIANTS = ("full", "tiny", "matched", "propensity", "reseeded", "bounds", "pilot", "crossed",
            "curves", "distinguish", "graded", "dpo_pilot")

# Graded levels of one family as named families (issue 27 item 4): the collusion note's marker
# at subtlety 0 (an obvious [[COLLUDE]] token), 1 (the phrase "as discussed" among look-alike
# phrases: the default family's cue) and 2 (an em dash among other joining punctuation).
GRADED = ({"name": "collusion", "subtlety": 0, "label": "collusion0"},
          {"name": "collusion", "subtlety": 1, "label": "collusion1"},
          {"name": "collusion", "subtlety": 2, "label": "collusion2"})


def get_config(arg: str | None = None):
  check_variant(arg, VARIANTS, __file__)
  c = base_config(arg)
  add_stage_sections(c, arg)        # catch, train_against, measure, distinguish (their defaults)
  c.experiment = "headline"
  # config.headline: what only the headline's plan varies (its cells and the power rule); the
  # stages' settings are in their own sections (configs/common.py add_stage_sections).
  h = c.headline = ml_collections.ConfigDict()
  h.seeds = (0, 1, 2)            # change the catch sample, the data order and the sampling
  h.ns = (1, 4, 16)              # training prompts per arm (capped by what was caught)
  # Each seed samples its own catch (M new prompts, new sampling draws). False: one catch per
  # family shared by the seeds (each draws its own N from it), which hides the catch-to-catch
  # spread (WORKSPACE: the collusion "reversal" of 2026-11-26 was one catch's).
  h.catch_per_seed = True
  # A crossed design (issue 27 item 6, the :crossed variant): every seed in `seeds` (the
  # training draw, data order and measurement sampling) against every catch seed here, so
  # the catch-to-catch and training-seed variances separate (analysis.variance_components).
  # None: each seed its own catch.
  h.catch_seeds = ml_collections.config_dict.placeholder(tuple)
  # + matched_control / propensity_control / oracle / disruption / dpo (stages/arms.py), e.g.
  #   --config.headline.arms="('treatment','control','dpo')"
  h.arms = ("treatment", "control")
  h.families = ml_collections.config_dict.placeholder(tuple)  # subset of organism families
  h.distinguish_seeds = (0,)     # seeds for the distinguishability measures
  # Return (issue 26 item 4): at N = return_n, the treatment's budget of benign SFT steps after
  # training, then the deployment rate again (also from the untrained organism); 0: off.
  h.return_n = 16
  # Statistical power of the headline points (the largest N): after the grid, seeds are added
  # there, per family, until treatment and control both have a 95% CI half-width of retained
  # misalignment <= power_goal (at least power_min_seeds seeds, at most power_max_seeds).
  # The hard families needed 23-31 seeds on the CPU organism (WORKSPACE.md); 0 turns it off.
  # power_target "contrast" (default): the goal is on the paired treatment - control contrast
  # of the retained gap (the primary's), 0.15 on this CPU and 0.1 on accelerator configs;
  # "arms": on each arm's own retained-misalignment interval (the earlier rule).
  h.power_target = "contrast"
  h.power_goal = 0.15
  h.power_min_seeds = 6
  h.power_max_seeds = 40
  if arg == "full":
    h.seeds = tuple(range(5))
    h.ns = (1, 4, 16, 64, 256)
    h.distinguish_seeds = tuple(range(5))
    h.power_max_seeds = 64
    h.power_goal = 0.1
  elif arg == "matched":
    # Adds a third arm: clean prompts matched one-to-one to the treatment's caught prompts on
    # the cue variant (e.g. the collusion note's distractor phrase) and task family. Is the
    # treatment-vs-control gap about the caught prompts' make-up, or about being caught?
    h.arms = ("treatment", "control", "matched_control")
    h.ns = (16,)
    h.seeds = tuple(range(6))
    h.power_max_seeds = 0          # a fixed 6-seed design
  elif arg == "propensity":
    # Adds a third arm: clean prompts matched one-to-one to the treatment's caught prompts on
    # the organism's teacher-forced attack probability. Is a caught prompt special because the
    # organism attacked there, or because it was likely to?
    h.arms = ("treatment", "control", "propensity_control")
    h.ns = (16,)
    h.seeds = tuple(range(6))
    h.power_max_seeds = 0          # a fixed 6-seed design
  elif arg == "reseeded":
    # The N = 16 points over 6 seeds, each seed with its own catch (the default's catch rule;
    # recorded with --config.headline.families="('collusion','year')").
    h.ns = (16,)
    h.seeds = tuple(range(6))
    h.power_max_seeds = 0
  elif arg == "bounds":
    # The arms that bound the effect (issue 26 item 3), at N = 16 over 6 fixed seeds on year
    # and collusion: oracle (the treatment's budget on deployment prompts: the most a catch
    # could remove) and disruption (the same budget on unrelated task data: what any SFT does).
    h.arms = ("treatment", "control", "oracle", "disruption")
    h.families = ("year", "collusion")
    h.ns = (16,)
    h.seeds = tuple(range(6))
    h.power_max_seeds = 0
  elif arg == "crossed":
    # The crossed design of issue 27 item 6 on year at N = 16: 4 catches x 4 training seeds
    # x 2 arms (32 cells), for the variance decomposition; fixed design, no power rule.
    h.families = ("year",)
    h.ns = (16,)
    h.seeds = (0, 1, 2, 3)
    h.catch_seeds = (0, 1, 2, 3)
    h.arms = ("treatment", "control")
    h.distinguish_seeds = ()
    h.return_n = 0
    h.power_max_seeds = 0
  elif arg == "curves":
    # Removal vs training step (issue 26 item 2): every arm trains a fixed 32 steps (8 epochs
    # of N = 16) at the stopping rule's lr / warm-up / constant schedule, measured every 4
    # steps (deployment and testing attack, KL), on year and collusion, 2 seeds; no power
    # rule, no return, no distinguishability.
    t = c.train_against
    t.stopping.enabled = False
    t.train.steps, t.train.lr, t.train.warmup_steps = 32, t.stopping.lr, t.stopping.warmup_steps
    t.curve_every = 4
    h.arms = ("treatment", "control", "oracle")
    h.families = ("year", "collusion")
    h.ns = (16,)
    h.seeds = (0, 1)
    h.distinguish_seeds = ()
    h.return_n = 0
    h.power_max_seeds = 0
  elif arg == "distinguish":
    # Distinguishability only (issue 27 item 4, the dose-response's x-axis): the distinguish
    # cells of every organism family at seed 0, no train-against arms. Its rows pool into a
    # sweep's report with `python -m catchjax.report SWEEP --distinguish THIS_WORKDIR`.
    h.arms = ()
    h.distinguish_seeds = (0,)
    h.return_n = 0
    h.power_max_seeds = 0
  elif arg == "graded":
    # A distinguishability axis inside one family (issue 27 item 4): an organism of its own
    # with collusion at three subtleties (GRADED; the default recipe otherwise), then the
    # default method (honeypot catch, stopping rule, return) at N = 16, treatment and control,
    # 3 fixed seeds, and the distinguishability cells at seed 0. Pre-registered in WORKSPACE.md
    # ("graded collusion") before its first row.
    c.organism.families = GRADED
    h.ns = (16,)
    h.seeds = (0, 1, 2)
    h.power_max_seeds = 0
  elif arg == "dpo_pilot":
    # The dpo arm's beta (issue 26 item 3), on the pilot seeds (outside every sweep's): the
    # treatment (its stopping rule sets the budget) and dpo at N = 16 on year and collusion.
    # Run once per beta in (0.05, 0.1, 0.3) with --config.train_against.dpo_beta=B into one
    # workdir (each beta its own config hash); the choice rule is pre-registered in WORKSPACE.md.
    h.ns = (16,)
    h.seeds = (100, 101)
    h.arms = ("treatment", "dpo")
    h.families = ("year", "collusion")
    h.distinguish_seeds = ()
    h.return_n = 0
    h.power_max_seeds = 0
  elif arg == "pilot":
    # The train-against pilot (issue 26 item 2): catch / training seeds outside every sweep's
    # (which start at 0), N = 16, treatment and control only, to choose lr, warm-up, eps and
    # the step cap so that the control keeps usefulness within 5 points. Its rows never enter
    # a sweep's analysis (their seeds and config hash differ).
    h.ns = (16,)
    h.seeds = (100, 101)
    h.arms = ("treatment", "control")
    h.distinguish_seeds = ()
    h.return_n = 0
    h.power_max_seeds = 0
  elif arg == "tiny":
    h.seeds = (0,)
    h.ns = (1, 2)
    h.power_max_seeds = 0
  return c


def derived_config(arg: str | None, experiment: str, dry_run: bool = False):
  """An extra experiment's config: the headline's organism recipe and stage sections (catch,
  train_against, measure, sampler) without the headline's own section, the stopping rule,
  sharpening and the distinguishability curve off (the extra experiments train fixed
  train_against.train.steps), the headline's workdir as the organism/catch cache
  (`cache_dir`; the run's own workdir under `:tiny`), and an empty `config.<experiment>`
  section to fill in. `dry_run=True` adds the `config.dry_run` switch (validate + print the
  plan, no compute)."""
  c = get_config(arg)
  del c["headline"]
  c.train_against.stopping.enabled = False
  c.measure.n_sharpen = 0
  c.distinguish.curve = False
  c.experiment = experiment
  c.cache_dir = "" if arg == "tiny" else "workdirs/headline"
  if dry_run:
    c.dry_run = False
  c[experiment] = ml_collections.ConfigDict()
  return c, c[experiment]
