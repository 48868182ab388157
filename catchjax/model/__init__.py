"""Model engine: the Flax nnx Llama-family decoder and Hugging Face / GGUF checkpoint I/O."""
from catchjax.model.config import ModelConfig, SUPPORTED_MODEL_TYPES  # noqa: F401
from catchjax.model.llama import Llama, LoRAParam, init_cache  # noqa: F401
