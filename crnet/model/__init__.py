"""CRNet modules: Siamese encoder, cross-reference, condition and refinement, assembled in `crnet.py`."""
