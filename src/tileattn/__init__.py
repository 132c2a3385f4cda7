"""tileattn: FlashAttention-2 in Triton, with a flash-attn compatible API.

    from tileattn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)   # q, k, v: (batch, seqlen, heads, head_dim)
"""

from .api import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .integrations.transformers import register as _register_with_transformers
from .kvcache import flash_attn_with_kvcache
from .varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

_register_with_transformers()  # attn_implementation="tileattn", when transformers is installed

__version__ = "0.1.0"
__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "__version__",
]
