import time, numpy as np
from configs.common import base_config
from catchjax.stages import organism as O, measure
from catchjax.stages.sampling import make_sampler
c = base_config(); c.model.hf_dir = "artifacts/smollm2-135m-instruct"
base = O.load_base(c)
sets = O.probe_sets(c, "hate", c.organism.probe_n)
s = make_sampler(c, base, c.organism.probe_batch, progress=False)
fn = O._probe_fn(s, sets, {}, "/tmp/pc.json", False, [0.0])
def old():
  return {f"{n}/{side}": float(measure.attack_prob_tf(s, v[side], v["prefix"]).mean()) for n, v in sets.items() for side in ("deploy","test")}
old(); fn(base, 0)  # warm
res = {"old": [], "new": []}
for _ in range(3):
  t = time.time(); a = old(); res["old"].append(time.time() - t)
  t = time.time(); b = fn(base, 0); res["new"].append(time.time() - t)
print({k: [round(x, 2) for x in v] for k, v in res.items()})
print("max abs diff", max(abs(a[k] - b[k]) for k in a), "ratio (median)", np.median(res["old"]) / np.median(res["new"]))
