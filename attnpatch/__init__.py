"""attnpatch: adversarial patches guided by a Stable Diffusion UNet's attention."""

from .errors import AttnPatchError
from .controllers import AttentionControl, AttentionStore, ComposeControl, ReweightCrossAttention
from .hijack import hijack, is_hijacked
from .images import check_image, to_diffusion_input
from .processor import ControlledAttnProcessor
from .sites import AttnSite
from .trace import trace_attention

__version__ = "0.1.0"

__all__ = [
    "AttnPatchError",
    "AttnSite",
    "AttentionControl",
    "AttentionStore",
    "ComposeControl",
    "ReweightCrossAttention",
    "ControlledAttnProcessor",
    "hijack",
    "is_hijacked",
    "trace_attention",
    "check_image",
    "to_diffusion_input",
    "__version__",
]
