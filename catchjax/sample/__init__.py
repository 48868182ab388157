"""Batched sampling and teacher-forced scoring for the Llama-family decoder (gemma-style).

`Sampler` (sampler.py) splits the nnx model once (`nnx.split`) and calls a few *pure* jitted
programs of (static `ProgramSpec`, state, arrays); JAX's own jit cache compiles each once per
static arguments and shapes, shared by all Samplers over the same architecture and mesh
(`compiles.py` records every compile for the report header). One file per job:

* params.py -- `SamplingParams` (what to sample; its static `mode`) and `SampleOutput`.
* logits.py -- one token per row from logits: greedy, temperature, top-k, top-p, inverse CDF.
* layout.py -- [shared prefix | left-padded suffix] batches, length buckets, cache slots and
  positions.
* spec.py -- `ProgramSpec` (graphdef, config, mesh, batch axes) and the batch constraint.
* prefill.py, decode.py, scoring.py -- the programs: prefill (whole batch or row groups), the
  decode while_loop (and compaction), teacher-forced scores and next-token log-probs.
* engine.py -- weights and batches placed on the device(s) / mesh, program calls.
* loop.py -- the host side of one batch: row-group prefill, chunked decode, EOS cuts.
* sampler.py -- the `Sampler` front: batching, `generate`, `score`, `next_token_logprobs`.

All shapes are static: prompts go in fixed-size batches (the last one padded with inactive
dummy rows), the prefix / suffix buckets come from `prompt_buckets`, the new-token count from
max_new_tokens rounded up to 8, and the EOS ids, pad id, temperature, top-k and top-p are
traced values -- so repeated calls never recompile. Prompts are sorted by length before
batching (results come back in the caller's order) so that buckets are tight.

Randomness is per row: row i at step t uses the key `fold_in(key(seed_i), t)`, so a prompt
samples the same tokens alone or inside any mixed batch (up to float round-off in the logits).
`SampleOutput.logprobs` are the RAW model log-probs of each chosen token (temperature 1, no
filtering); so are `score` (log p(continuation token | everything before it)) and
`next_token_logprobs` (log p(candidate | prompt), e.g. A-vs-B choices).

Sharding: with `mesh` given, batch-major arrays are sharded over the mesh's batch axes and the
weights by the training rules (engine.py). Experiments build their Sampler with
`catchjax.stages.sampling.make_sampler`, on the mesh of `config.sampler`.
"""
from catchjax.sample.compiles import compile_count, compiled_text
from catchjax.sample.layout import DEFAULT_PROMPT_BUCKETS
from catchjax.sample.logits import fast_argmax, inverse_cdf_sample, sample_from_logits
from catchjax.sample.params import SampleOutput, SamplingParams
from catchjax.sample.sampler import Sampler
from catchjax.sample.spec import ProgramSpec

__all__ = ["DEFAULT_PROMPT_BUCKETS", "ProgramSpec", "SampleOutput", "Sampler", "SamplingParams",
           "compile_count", "compiled_text", "fast_argmax", "inverse_cdf_sample",
           "sample_from_logits"]
