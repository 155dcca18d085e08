"""DICOM ingress: routing rules (and, as they land, the STOW-RS and C-STORE receivers and the SR writer)."""
