"""The name our folders' model_file imports (`install()`, called when mlx-lm loads the folder).
Under `mlx_lm.server` it adds the document-prefix split of `mlx_lm_hooks`; elsewhere nothing."""

import sys


def install():
    if "mlx_lm.server" in sys.modules:
        from .mlx_lm_hooks import install as split_document_prefix

        split_document_prefix()
