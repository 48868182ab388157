"""catchjax: does training against caught misalignment remove it, or make the model sneakier?

Pipeline: data -> organism -> catch -> train_against -> measure -> report, on top of three
engines that know nothing about misalignment: `model` (Flax Llama family + HF/GGUF I/O),
`train` (sharded SFT loop + orbax) and `sample` (batched sampling + teacher-forced scoring).
"""

import os as _os

# Nothing is fetched from the network at run time: models load from local HF folders.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
