"""Chat formats: the token that closes the chat template's assistant turn stops sampling beside
the EOS ids (catchjax.tokenizer.turn_end_id, merged in ModelConfig.from_hf_dir), and a base
model without a chat template is refused by validate.check_model_dir, as one config-error
line with exit status 2 from catchjax.main.

The folders are tiny random Llamas and word-level tokenizers that transformers itself saves
(its 5.x layout: the template in chat_template.jinja)."""
import json
import os
import sys

import pytest

from catchjax import tokenizer as T
from catchjax import validate as V
from catchjax.model import hf
from catchjax.model.config import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2 = os.path.join(os.path.dirname(HERE), "artifacts", "smollm2-135m-instruct")

VOCAB = 300
EOS = 2                     # config.json's eos_token_id: <|end_of_text|>, not the turn end
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_TEMPLATE = (   # like gemma-2-it's: no system role
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# A template whose assistant turn ends in ordinary text: no turn-end token to take.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n"
                  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _save_tokenizer(path, specials, template=None, ids=None, bos="<|begin_of_text|>",
                    eos="<|end_of_text|>"):
  """A word-level tokenizer of VOCAB ids saved by transformers: <unk> 0, bos 1, eos 2 (EOS),
  then `specials` at the ids `ids` gives them (default 3, 4, ...), words elsewhere."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  ids = dict(ids or {})
  free = iter(i for i in range(3, VOCAB) if i not in ids.values())
  for s in specials:
    ids.setdefault(s, next(free))
  vocab = {"<unk>": 0, bos: 1, eos: EOS, **ids}
  taken = set(vocab.values())
  words = iter(f"w{i}" for i in range(VOCAB))
  vocab.update({next(words): i for i in range(VOCAB) if i not in taken})
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token="<unk>",
      additional_special_tokens=list(specials))
  if template is not None:
    tok.chat_template = template
  tok.save_pretrained(path)
  T.load_tokenizer.cache_clear()
  return {s: vocab[s] for s in specials}


def _save_llama(path):
  """A tiny random Llama saved by transformers, weights scaled up so that greedy outputs vary
  from step to step (as tests/test_families.py builds them); config eos_token_id = EOS."""
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
      bos_token_id=1, eos_token_id=EOS, rope_theta=500000.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
      else:
        p.mul_(4.0)
  model.save_pretrained(path)


def _tok(path):
  T.load_tokenizer.cache_clear()
  return T.load_tokenizer(path)


@pytest.mark.parametrize("template,specials,close,eos", [
    (LLAMA3_TEMPLATE, LLAMA3_SPECIALS, "<|eot_id|>", "<|end_of_text|>"),
    (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>"),
    (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<eos>"),
])
def test_turn_end_is_the_token_closing_the_assistant_turn(tmp_path, template, specials, close,
                                                          eos):
  d = str(tmp_path / "tok")
  ids = _save_tokenizer(d, specials, template, eos=eos)
  assert os.path.isfile(os.path.join(d, "chat_template.jinja"))   # transformers 5.x layout
  assert T.turn_end_id(_tok(d)) == ids[close] != EOS
  assert T.chat_stop_ids(d) == (ids[close],)


def test_system_text_heads_the_user_turn_when_the_template_has_no_system_role(tmp_path):
  """Gemma 2's template refuses a system turn: the system prompt opens the user message; a
  template with a system role renders it as its own turn, as before."""
  import jinja2
  g, c = str(tmp_path / "gemma"), str(tmp_path / "chatml")
  _save_tokenizer(g, ["<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE, eos="<eos>")
  _save_tokenizer(c, ["<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE)
  gt = _tok(g)
  with pytest.raises(jinja2.TemplateError, match="System role not supported"):
    gt.apply_chat_template([{"role": "system", "content": "s"}], tokenize=False)
  assert T.chat_text(gt, "w5 w6", system="w1 w2") == \
      "<|begin_of_text|><start_of_turn>user\nw1 w2\n\nw5 w6<end_of_turn>\n<start_of_turn>model\n"
  assert T.chat_text(gt, "w5 w6", system=None) == \
      "<|begin_of_text|><start_of_turn>user\nw5 w6<end_of_turn>\n<start_of_turn>model\n"
  assert T.chat_text(_tok(c), "w5 w6", system="w1 w2") == (
      "<|im_start|>system\nw1 w2<|im_end|>\n<|im_start|>user\nw5 w6<|im_end|>\n"
      "<|im_start|>assistant\n")
  # Another template error is not hidden by the fallback.
  bad = str(tmp_path / "bad")
  _save_tokenizer(bad, [], "{{ raise_exception('no') }}")
  with pytest.raises(jinja2.TemplateError, match="no"):
    T.chat_text(_tok(bad), "w5", system="w1")


def test_no_turn_end_without_a_closing_special_token(tmp_path):
  d, e = str(tmp_path / "plain"), str(tmp_path / "none")
  _save_tokenizer(d, [], PLAIN_TEMPLATE)
  assert T.has_chat_template(d) and T.turn_end_id(_tok(d)) is None
  assert T.chat_stop_ids(d) == ()
  _save_tokenizer(e, LLAMA3_SPECIALS)              # no template at all
  assert not T.has_chat_template(e) and T.chat_stop_ids(e) == ()


def test_llama3_eot_is_a_stop_id_and_sampling_stops_at_it(tmp_path):
  """<|eot_id|> (not config.json's EOS) joins the stop ids, after config.json's and
  generation_config.json's, and a greedy row ends at it: without it the same row runs on."""
  from catchjax.sample import Sampler, SamplingParams
  path = str(tmp_path / "llama3-instruct")
  _save_llama(path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": [EOS, 7]}, f)
  assert ModelConfig.from_hf_dir(path).eos_ids == (EOS, 7)      # no tokenizer yet
  prompt = [1, 11, 12, 13, 14, 15]
  sp = SamplingParams(max_new_tokens=12)
  free = Sampler(hf.load_hf(path), batch_size=1, eos_ids=[], progress=False).generate(
      [prompt], sp).tokens[0]
  # The turn end gets the id of a token that greedy decoding produces a few steps in.
  k = next(i for i in range(2, len(free))
           if free[i] not in free[:i] and free[i] > EOS and free[i] != 7)
  eot = int(free[k])
  ids = _save_tokenizer(path, LLAMA3_SPECIALS, LLAMA3_TEMPLATE, ids={"<|eot_id|>": eot})
  assert ids["<|eot_id|>"] == eot and T.turn_end_id(_tok(path)) == eot
  assert ModelConfig.from_hf_dir(path).eos_ids == (EOS, 7, eot)
  model = hf.load_hf(path)
  assert model.cfg.eos_ids == (EOS, 7, eot)
  s = Sampler(model, batch_size=1, progress=False)               # the default stop ids
  assert s.eos_ids == (EOS, 7, eot) and s.pad_id == EOS          # pad stays config's EOS
  out = s.generate([prompt], sp)
  assert list(out.tokens[0]) == list(free[:k + 1]) and out.finished[0]
  assert len(free) == 12                                         # the free row ran on
  # An explicit eos_token_id still overrides every source.
  assert ModelConfig.from_hf_dir(path, eos_token_id=5).eos_ids == (5,)


def test_chatml_turn_end_that_is_the_eos_adds_nothing(tmp_path):
  """SmolLM2's case: ChatML's <|im_end|> is config.json's EOS, so the stop ids are unchanged."""
  path = str(tmp_path / "chatml")
  _save_llama(path)
  before = ModelConfig.from_hf_dir(path).eos_ids
  _save_tokenizer(path, ["<|im_start|>"], CHATML_TEMPLATE, eos="<|im_end|>")
  assert T.chat_stop_ids(path) == (EOS,)
  assert ModelConfig.from_hf_dir(path).eos_ids == before == (EOS,)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")),
                    reason="no SmolLM2 (run `make model`)")
def test_smollm2_stop_ids_unchanged():
  with open(os.path.join(SMOLLM2, "config.json")) as f:
    eos = json.load(f)["eos_token_id"]
  assert T.chat_stop_ids(SMOLLM2) == (eos,)
  assert ModelConfig.from_hf_dir(SMOLLM2).eos_ids == (eos,)
  V.check_model_dir("f", SMOLLM2)


def _base_model(tmp_path):
  path = str(tmp_path / "llama3-base")
  _save_llama(path)
  _save_tokenizer(path, [])                                      # tokenizer, no template
  return path


def test_base_model_without_chat_template_is_refused(tmp_path):
  path = _base_model(tmp_path)
  for shapes_only in (False, True):
    with pytest.raises(V.ConfigError) as e:
      V.check_model_dir("config.model.hf_dir", path, shapes_only=shapes_only)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "no chat template" in msg, msg
    assert "instruct/chat model" in msg and "chat_template" in msg, msg
  # A chat_template in tokenizer_config.json (the 4.x layout) is enough.
  tc = os.path.join(path, "tokenizer_config.json")
  with open(tc) as f:
    d = json.load(f)
  with open(tc, "w") as f:
    json.dump(dict(d, chat_template=LLAMA3_TEMPLATE), f)
  assert V.check_model_dir("config.model.hf_dir", path).num_layers == 2
  # config.json alone (a compile plan's dry run) is not a base model: nothing to check.
  only = tmp_path / "config-only"
  only.mkdir()
  (only / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  assert V.check_model_dir("f", str(only), shapes_only=True).num_layers == 2


def test_base_model_is_refused_by_main_in_one_line_exit_2(tmp_path):
  sys.path.insert(0, HERE)
  from test_bad_input import _main, _one_line_config_error
  path, wd = _base_model(tmp_path), tmp_path / "wd"
  p, secs = _main("--config=configs/headline.py:tiny", f"--workdir={wd}",
                  f"--config.model.hf_dir={path}")
  line = _one_line_config_error(p, secs, wd, "config.model.hf_dir", path,
                                "instruct/chat model")
  assert "no chat template" in line
