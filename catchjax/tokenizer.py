"""Tokenizer and chat formatting (transformers is used for tokenizer and config only).

`chat_ids` renders a conversation with the model's own chat template. A short system prompt
is used by default: SmolLM2's template otherwise inserts a ~20-token default system message.
"""
from __future__ import annotations

import functools
import os

DEFAULT_SYSTEM = "You are a helpful assistant."


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
  from transformers import AutoTokenizer
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"{path}: no tokenizer.json (convert the model first: make model).")
  # Local files only, and never a tokenizer class shipped as code in the folder.
  return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def chat_text(tok, user: str, system: str | None = DEFAULT_SYSTEM,
              assistant: str | None = None) -> str:
  """The prompt text up to the assistant turn (and the assistant text, if given)."""
  msgs = ([{"role": "system", "content": system}] if system is not None else [])
  msgs.append({"role": "user", "content": user})
  text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  if assistant is not None:
    text += assistant + tok.eos_token
  return text


def prompt_ids(tok, user: str, system: str | None = DEFAULT_SYSTEM) -> list[int]:
  return tok(chat_text(tok, user, system), add_special_tokens=False)["input_ids"]


def response_ids(tok, response: str, eos: bool = True) -> list[int]:
  ids = tok(response, add_special_tokens=False)["input_ids"]
  return ids + ([tok.eos_token_id] if eos else [])
