"""attnpatch: adversarial patches guided by a Stable Diffusion UNet's attention."""

from .errors import AttnPatchError
from .images import check_image, to_diffusion_input

__version__ = "0.1.0"

__all__ = ["AttnPatchError", "check_image", "to_diffusion_input", "__version__"]
