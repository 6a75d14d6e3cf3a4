"""Frozen image encoders that produce ``Features`` (see ``base``).

- ``timm_vit.TimmViTEncoder``: timm ViTs (DINOv3, DINOv2, ...), multi-layer grids (layers are 1-based block numbers, as for every encoder).
- ``clip.CLIPEncoder``: open_clip ViTs with the optional V-V stream (MRAD), 1-based block numbers.
- ``clip_text.CLIPTextEncoder``: the same CLIP model's text tower with deep prompts (MRAD-CLIP).
- ``weights``: ``pretrained`` resolution (tag / local file / random), fast offline failures.
- ``postprocess``: ``neighbor_average`` and other pure helpers.

Submodules are imported on use: open_clip alone takes seconds to import.
"""
