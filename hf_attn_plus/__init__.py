"""hf_attn_plus: efficient attention mechanisms for Hugging Face Transformers models.

`import hf_attn_plus` registers every mechanism, so `attn_implementation="hf_attn_plus:<name>"` works in
`from_pretrained`, `from_config` and `set_attn_implementation`; options live in `config.hf_attn_plus`.
"""

from . import mechanisms as _mechanisms  # noqa: F401  (importing registers them)
from .attention import UnsupportedModelError
from .integration import register_with_transformers, set_attention
from .options import OptionError
from .patches.convert import MechanismWeightsError
from .registry import PREFIX, get_mechanism, mechanisms

register_with_transformers()

__version__ = "0.1.0"
__all__ = [
    "PREFIX",
    "MechanismWeightsError",
    "OptionError",
    "UnsupportedModelError",
    "get_mechanism",
    "mechanisms",
    "set_attention",
]
