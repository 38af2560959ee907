"""Heads for :func:`vitkit.build_model` (defined in :mod:`vitkit.models.heads`; this is their public name)::

    from vitkit.heads import MLPHead
    head = MLPHead(input_dim=768, hidden_dims=[512, 256], output_dim=100, dropout=0.1, activation="gelu")
    model = vitkit.build_model("dino_v2_vit", head=head)
"""

from vitkit.models.heads import ACTIVATIONS, BaseHead, IdentityHead, LinearHead, MLPHead, make_activation

__all__ = ["ACTIVATIONS", "BaseHead", "IdentityHead", "LinearHead", "MLPHead", "make_activation"]
