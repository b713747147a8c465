"""Heads that read the composer's outputs: localization (per-token points) now; box
proposals (dense captioning) and masks (referring segmentation) belong here too."""
