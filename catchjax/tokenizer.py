"""Tokenizer and chat formatting (transformers is used for tokenizer and config only).

`chat_text` renders a conversation with the model's own chat template. A short system prompt
is used by default: SmolLM2's template otherwise inserts a ~20-token default system message
(a template without a system role, Gemma 2's, gets it at the head of the user message).

Every prompt goes through the chat template, so a model folder must have one
(`has_chat_template`, checked by validate.check_model_dir; the one exception is a base model
trained on raw-text completions data, whose prompts are its input text as it is: `chat_text`
of a tokenizer without a template), and the token that closes the
assistant's turn in it (`turn_end_id`: Llama-3's <|eot_id|>, ChatML's <|im_end|>, Gemma's
<end_of_turn>) stops sampling beside the EOS ids (`chat_stop_ids`, merged into
ModelConfig.eos_ids by ModelConfig.from_hf_dir).
"""
from __future__ import annotations

import functools
import json
import logging
import os

DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_TOKENIZER_CONFIG_BYTES = 64 << 20
# Contents of the probe conversation `turn_end_id` renders: plain words that no template
# rewrites, and that occur nowhere else in a rendered conversation.
_PROBE_USER, _PROBE_REPLY = "catchjaxprobequestion", "catchjaxprobereply"


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
  from transformers import AutoTokenizer
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"{path}: no tokenizer.json (convert the model first: make model).")
  # Local files only, and never a tokenizer class shipped as code in the folder.
  return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def chat_text(tok, user: str, system: str | None = DEFAULT_SYSTEM,
              assistant: str | None = None) -> str:
  """The prompt text up to the assistant turn (and the assistant text, if given).

  A template that refuses a system turn (Gemma 2's raises "System role not supported") gets
  the system text at the head of the user message instead, "{system}\n\n{user}"; a template
  that takes a system turn is rendered with it, as before.

  A tokenizer without a chat template (a base model, allowed only with raw-text completions
  data, validate.check_common) renders `user` as the model's whole input text, after the BOS
  token where the tokenizer adds one to plain text; `system` is not used."""
  from jinja2 import TemplateError
  if not getattr(tok, "chat_template", None):
    ids = tok("a")["input_ids"]
    bos_id = getattr(tok, "bos_token_id", None)
    bos = tok.bos_token if bos_id is not None and ids[:1] == [bos_id] else ""
    return (bos or "") + user + ("" if assistant is None else assistant + tok.eos_token)
  user_msg = {"role": "user", "content": user}
  if system is None:
    text = tok.apply_chat_template([user_msg], tokenize=False, add_generation_prompt=True)
  else:
    try:
      text = tok.apply_chat_template([{"role": "system", "content": system}, user_msg],
                                     tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
      try:
        text = tok.apply_chat_template([{"role": "user", "content": f"{system}\n\n{user}"}],
                                       tokenize=False, add_generation_prompt=True)
      except TemplateError:
        raise e from None
  if assistant is not None:
    text += assistant + tok.eos_token
  return text


def prompt_ids(tok, user: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
  return tok(chat_text(tok, user, system), add_special_tokens=False)["input_ids"]


def response_ids(tok, response: str, eos: bool = True) -> list[int]:
  ids = tok(response, add_special_tokens=False)["input_ids"]
  return ids + ([tok.eos_token_id] if eos else [])


def _json_file(path: str):
  if not os.path.isfile(path) or os.path.getsize(path) > MAX_TOKENIZER_CONFIG_BYTES:
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None


def has_chat_template(path: str) -> bool:
  """Whether the model folder gives a chat template, from its files alone (no tokenizer is
  loaded): a non-empty `chat_template` in tokenizer_config.json (a string, or a list of named
  templates), a chat_template.jinja file (how transformers 5.x saves it) or a
  chat_template.json (`{"chat_template": ...}`), the places transformers reads it from."""
  jinja = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja) and os.path.getsize(jinja) > 0:
    return True
  for fn in ("tokenizer_config.json", "chat_template.json"):
    d = _json_file(os.path.join(path, fn))
    if isinstance(d, dict) and d.get("chat_template"):
      return True
  return False


def turn_end_id(tok) -> int | None:
  """The id of the token that closes the assistant's turn in `tok`'s chat template, or None.

  The rule: render the conversation [user, assistant] (no generation prompt) and take the
  added (special) token that the text right after the assistant's content starts with, white
  space skipped; the longest such token when several match. That is <|eot_id|> for Llama-3
  Instruct, <|im_end|> for ChatML (SmolLM2, Qwen2.5, Qwen3), <end_of_turn> for Gemma and
  </s> for Mistral. None when the template has no chat template, cannot render that
  conversation, or closes the turn with ordinary text."""
  if not getattr(tok, "chat_template", None):
    return None
  msgs = [{"role": "user", "content": _PROBE_USER},
          {"role": "assistant", "content": _PROBE_REPLY}]
  try:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
  except Exception as e:  # noqa: BLE001 - templates raise their own errors (raise_exception)
    logging.warning("chat template cannot render a user/assistant turn (%s); its turn end "
                    "is not a stop id", e)
    return None
  if not isinstance(text, str) or text.count(_PROBE_REPLY) != 1:
    return None
  tail = text.split(_PROBE_REPLY, 1)[1].lstrip()
  added = tok.get_added_vocab()   # special and added tokens: str -> id
  hits = [t for t in added if t and tail.startswith(t)]
  return int(added[max(hits, key=len)]) if hits else None


def chat_stop_ids(path: str) -> tuple[int, ...]:
  """(turn_end_id,) of the model folder's tokenizer, or () when the folder has no tokenizer or
  no chat template, or its tokenizer cannot be loaded (that error comes where the tokenizer
  is used)."""
  if not os.path.isfile(os.path.join(path, "tokenizer.json")) or not has_chat_template(path):
    return ()
  try:
    tok = load_tokenizer(path)
  except Exception as e:  # noqa: BLE001 - reported where the tokenizer is loaded for use
    logging.warning("%s: tokenizer not loadable (%s); no chat-template stop id", path, e)
    return ()
  i = turn_end_id(tok)
  return () if i is None else (i,)
